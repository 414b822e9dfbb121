"""Audit records for changes an operator makes from the command line; the admin API audits its own.

The CLI is another process than the server, so it appends to its own file, audit.cli.jsonl
(and the shared audit.db index), durably before the command reports success. The record has
the admin API's shape: who (the OS user), what, which key, and before/after public views,
never a secret or its hash.
"""

from __future__ import annotations

import getpass
import socket
import sqlite3
from pathlib import Path
from typing import Any

from ..audit.writer import AuditWriter, admin_record
from ..errors import AuditUnavailable
from ..settings import Settings

CLI_AUDIT_FILE = "audit.cli.jsonl"


def operator() -> str:
    """Who ran the command, as far as this host can tell: `cli:<user>@<host>`."""
    try:
        user = getpass.getuser()
    except Exception:   # no passwd entry (a bare container uid): still say it was the CLI
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def cli_record(action: str, target: str | None = None, *, detail: Any = None,
               before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> dict[str, Any]:
    return admin_record(operator(), "cli", action, target, detail=detail, before=before, after=after)


def check_cli_audit(settings: Settings) -> None:
    """Raise AuditUnavailable now if the audit log cannot be opened for writing, so that a change
    is refused before it is made: a key was issued, its secret never shown, then the command failed."""
    import asyncio
    asyncio.run(_open_cli_audit(settings, None))


async def write_cli_audit(settings: Settings, record: dict[str, Any]) -> None:
    """Append `record` durably; raises AuditUnavailable if it could not be written."""
    await _open_cli_audit(settings, record)


async def _open_cli_audit(settings: Settings, record: dict[str, Any] | None) -> None:
    """Open the CLI's audit writer and append `record` (none: only check it opens)."""
    writer = AuditWriter(Path(settings.data_dir), max_bytes=settings.audit.max_bytes,
                         retention_days=settings.audit.retention_days, durability="strict",
                         file_name=CLI_AUDIT_FILE)
    try:
        await writer.start()
        try:
            if record is not None:
                await writer.submit_durable(record)
        finally:
            await writer.close()
    except AuditUnavailable:
        raise
    except (OSError, sqlite3.Error) as exc:   # no audit dir, disk full, index unwritable
        raise AuditUnavailable(f"audit_unwritable: {exc}") from exc
