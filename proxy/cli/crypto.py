"""`seekgate crypto`: rotate the data key, root, session signing key or pepper, and show their state (JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AuditUnavailable
from ..keys.crypto_ops import ACTIONS, perform
from ..keys.envelope import EnvelopeError
from ..keys.kek import KekError
from ..keys.secrets_setup import open_keyring
from ..settings import Settings
from ..store.backend import open_store
from .audit import check_cli_audit, cli_record, write_cli_audit
from .common import CliError, load


async def run_crypto(action: str, settings: Settings) -> dict[str, Any]:
    """Run one `seekgate crypto` action on the server's store; what it prints, as a dict.

    Safe while servers run: they pick the change up within crypto.refresh_interval_s.
    """
    data_dir = Path(settings.data_dir)
    store = await open_store(settings.store, data_dir)
    try:
        keyring = await open_keyring(settings, data_dir, store)
        try:
            result = await perform(keyring, action)
            if action != "status":
                # What it printed is ids and times only, so it is also the audit record's detail.
                await write_cli_audit(settings, cli_record(f"crypto.{action}", detail=result))
            return result
        finally:
            keyring.close()
    finally:
        await store.close()


def cmd_crypto(args: argparse.Namespace) -> int:
    settings = load(args)
    try:
        if args.crypto_action != "status":   # refuse before rotating, not after: nothing half-done
            check_cli_audit(settings)
        result = asyncio.run(run_crypto(args.crypto_action, settings))
    except (KekError, EnvelopeError, ValueError, AuditUnavailable) as exc:
        raise CliError(f"crypto {args.crypto_action}: {exc}") from None
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def add_crypto_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """`seekgate crypto ACTION`, under the parser's subcommands `sub`, built with cli/main.py's `cmd` helper."""
    crypto = sub.add_parser("crypto", help="envelope encryption: rotation and status").add_subparsers(
        dest="crypto_command", required=True, metavar="ACTION")
    for action, (help_text, _) in ACTIONS.items():
        p = cmd(crypto, action, cmd_crypto, help_text)
        p.set_defaults(crypto_action=action)
