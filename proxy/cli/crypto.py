"""`seekgate crypto`: rotate the data key, root, session signing key or pepper, and show their state (JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .audit import cli_record, write_cli_audit
from ..errors import AuditUnavailable
from ..keys.envelope import EnvelopeError
from ..keys.kek import KekError
from ..keys.rotation import Keyring
from ..keys.secrets_setup import open_keyring
from ..paths import store_path
from ..settings import Settings
from ..store.sqlite import SqliteStore

ACTIONS: dict[str, tuple[str, Callable[[Keyring], Any]]] = {
    "rotate-dek": ("new data key for new writes; re-encrypt every stored secret under it",
                   lambda k: k.rotate_dek()),
    "rotate-root": ("new root at the KEK provider; re-wrap every data key (secrets untouched)",
                    lambda k: k.rotate_root()),
    "rotate-jwt": ("new session signing key; the old kid verifies for session TTL + leeway",
                   lambda k: k.rotate_jwt()),
    "rotate-pepper": ("new key-hashing pepper; keys are re-hashed on their next successful use",
                      lambda k: k.rotate_pepper()),
    "status": ("root, data keys, signing keys and pepper versions, with rotation times", lambda k: k.status()),
}


async def perform(keyring: Keyring, action: str) -> dict[str, Any]:
    """One ACTIONS entry on `keyring` (the CLI's own, or a server's for the admin API); ids and times only."""
    _, fn = ACTIONS[action]
    result: dict[str, Any] = await fn(keyring)
    if action != "status":
        await keyring.maintain()   # finish what the rotation started (re-wrap, retire)
    return result


def summary(status: dict[str, Any]) -> dict[str, Any]:
    """What a rotation changes, from `status`: an audit record's before/after (ids only, never a secret)."""
    return {"root": status["root"]["key_id"], "dek": status["dek"]["current"],
            "jwt_kid": status["jwt"]["active_kid"], "pepper_versions": status["pepper"]["versions"]}


async def run_crypto(action: str, settings: Settings) -> dict[str, Any]:
    """Run one `seekgate crypto` action on the server's store; what it prints, as a dict.

    Safe while servers run: they pick the change up within crypto.refresh_interval_s.
    """
    data_dir = Path(settings.data_dir)
    store = await SqliteStore.open(store_path(data_dir))
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
    from .main import CliError, load
    try:
        result = asyncio.run(run_crypto(args.crypto_action, load(args)))
    except (KekError, EnvelopeError, ValueError, AuditUnavailable) as exc:
        raise CliError(f"crypto {args.crypto_action}: {exc}") from None
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def add_crypto_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """`seekgate crypto ACTION`, under the parser's subcommands `sub`, built with cli.py's `cmd` helper."""
    crypto = sub.add_parser("crypto", help="envelope encryption: rotation and status").add_subparsers(
        dest="crypto_command", required=True, metavar="ACTION")
    for action, (help_text, _) in ACTIONS.items():
        p = cmd(crypto, action, cmd_crypto, help_text)
        p.set_defaults(crypto_action=action)
