"""Where seekgate keeps its files under data_dir, named once so the CLI and the server agree."""

from __future__ import annotations

from pathlib import Path


def store_path(data_dir: Path) -> Path:
    """The SQLite key store."""
    return Path(data_dir) / "seekgate.db"


def tiny_checkpoint_path(data_dir: Path) -> Path:
    """Where `seekgate up` / `seekgate triton` build the tiny checkpoint when none is configured."""
    return Path(data_dir) / "checkpoints" / "deepseek-tiny"
