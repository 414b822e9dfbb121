"""`seekgate db`: apply the store's schema migrations, and copy a whole store into another (JSON out)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from ..errors import StoreUnavailable
from ..settings import Settings
from ..store import StoreConflict
from ..store.backend import SQLITE_SCHEME, describe, is_postgres, open_store, open_url, redact
from ..store.copy import copy_store
from ..store.pg_schema import LATEST, migrate, schema_version
from .audit import cli_record, write_cli_audit
from .common import CliError, load


async def run_migrate(settings: Settings) -> dict[str, Any]:
    """Bring the configured store's schema up to date; what was applied. SQLite files migrate themselves on open."""
    if not is_postgres(settings.store.url):
        store = await open_store(settings.store, Path(settings.data_dir))
        await store.close()
        return {"store": describe(store), "applied": [], "version": "current"}
    # A bare connection: PostgresStore.open refuses a schema that is not current.
    try:
        conn = await asyncpg.connect(settings.store.url, timeout=settings.store.timeout_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise StoreUnavailable(f"store_unavailable: {redact(settings.store.url)}: {exc}") from None
    try:
        applied = await migrate(conn)
        version = await schema_version(conn)
    finally:
        await conn.close()
    return {"store": "postgresql " + redact(settings.store.url), "applied": applied, "version": version,
            "latest": LATEST}


def _check_url(flag: str, url: str, *, must_exist: bool) -> None:
    """Refuse before opening: SQLite creates a missing file, so a mistyped --from copied an empty store
    and exited 0, and an unknown scheme (mysql://...) became a SQLite file named after it."""
    if is_postgres(url):
        return
    if "://" in url and not url.startswith(SQLITE_SCHEME):
        raise CliError(f"db copy: {flag} {url!r}: use postgresql://..., sqlite:///path or a file path", 2)
    path = Path(url.removeprefix(SQLITE_SCHEME))
    if must_exist and not path.is_file():
        raise CliError(f"db copy: {flag} {path}: no such SQLite file", 2)


async def run_copy(settings: Settings, source: str, target: str) -> dict[str, Any]:
    _check_url("--from", source, must_exist=True)
    _check_url("--to", target, must_exist=False)
    src = await open_url(source)
    try:
        dst = await open_url(target, migrate=True)
        try:
            report = await copy_store(src, dst)
            result = {"from": describe(src), "to": describe(dst), **report.as_dict()}
        finally:
            await dst.close()
    finally:
        await src.close()
    await write_cli_audit(settings, cli_record("db.copy", detail=result))
    return result


def cmd_db_migrate(args: argparse.Namespace) -> int:
    settings = load(args)
    result = asyncio.run(run_migrate(settings))
    if result["applied"]:
        asyncio.run(write_cli_audit(settings, cli_record("db.migrate", detail=result)))
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_db_copy(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(run_copy(load(args), args.source, args.target))
    except StoreConflict as exc:
        raise CliError(f"db copy: {exc}") from None
    print(json.dumps(result, sort_keys=True))
    return 0


def add_db_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """`seekgate db ACTION`, under the parser's subcommands `sub`, built with cli/main.py's `cmd` helper."""
    db = sub.add_parser("db", help="the key store: schema migrations, copying a store").add_subparsers(
        dest="db_command", required=True, metavar="ACTION")
    cmd(db, "migrate", cmd_db_migrate, "apply pending schema migrations to store.url (idempotent)")
    p = cmd(db, "copy", cmd_db_copy, "copy every key, secret and revocation into an empty store "
                                     "(keys keep working with the same secret)")
    p.add_argument("--from", dest="source", required=True,
                   help="source store: a SQLite file (path or sqlite:///path) or postgresql://...")
    p.add_argument("--to", dest="target", required=True,
                   help="target store (migrated first): postgresql://... or a SQLite file")
