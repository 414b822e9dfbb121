"""Start-up wiring of the recoverable secrets: KEK provider -> envelope -> JWT signing keys."""

from __future__ import annotations

from pathlib import Path

from proxy.keys.envelope import Envelope
from proxy.keys.kek import FileKek
from proxy.keys.sessions import SessionAuthority, load_signing_keys
from proxy.settings import Settings
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows


async def open_envelope(data_dir: Path, store: SqliteStore) -> tuple[Envelope, SqliteSecretRows]:
    """The envelope over the store's secret rows, keyed by the `file` KEK in `<data_dir>/secrets/root.key`."""
    rows = await SqliteSecretRows.open(store)
    return Envelope(rows, FileKek.load_or_create(data_dir)), rows


async def open_sessions(settings: Settings, data_dir: Path, store: SqliteStore) -> SessionAuthority:
    """The session authority with every stored signing key loaded (the first one made on first start)."""
    envelope, rows = await open_envelope(data_dir, store)
    keys, active = await load_signing_keys(envelope)
    auth = settings.auth
    return SessionAuthority(keys, active, issuer=auth.session_issuer, audience=auth.session_audience,
                            ttl_s=auth.session_ttl_s, revocations=rows)
