"""What every `seekgate` subcommand shares: the settings it runs under and its one-line failure."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import Settings, load_settings

DEFAULT_CONFIG = Path("config/seekgate.yaml")


class CliError(Exception):
    """A one-line failure for stderr, with the exit code to return."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def load(args: argparse.Namespace) -> Settings:
    """Settings from --config (or config/seekgate.yaml if present), env, and --data-dir."""
    config = Path(args.config) if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if args.config and not config.exists():  # type: ignore[union-attr]
        raise CliError(f"config file {config} does not exist", 2)
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    return load_settings(config, overrides=overrides)
