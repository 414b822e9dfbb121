"""Which store a process opens: SQLite under data_dir (store.url empty) or the PostgreSQL at store.url."""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias

from proxy.paths import store_path
from proxy.settings import StoreSettings
from proxy.store.postgres import PostgresStore
from proxy.store.postgres_secrets import PostgresSecretRows
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows

Store: TypeAlias = SqliteStore | PostgresStore
SecretRows: TypeAlias = SqliteSecretRows | PostgresSecretRows

SQLITE_SCHEME = "sqlite:///"


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


async def open_store(store: StoreSettings, data_dir: Path) -> Store:
    """The configured store, open; StoreUnavailable (one line, no password) if it cannot be."""
    if is_postgres(store.url):
        return await PostgresStore.open(store.url, pool_size=store.pool_size, auto_migrate=store.auto_migrate,
                                        timeout_s=store.timeout_s)
    return await SqliteStore.open(store_path(Path(data_dir)))


async def open_url(url: str, *, migrate: bool = False) -> Store:
    """A store named by URL alone (`seekgate db copy`): postgresql://..., sqlite:///path, or a bare path."""
    if is_postgres(url):
        return await PostgresStore.open(url, pool_size=2, auto_migrate=migrate)
    return await SqliteStore.open(Path(url.removeprefix(SQLITE_SCHEME)))


async def open_secret_rows(store: Store) -> SecretRows:
    """The envelope's rows and the session denylist, in the same store as the keys."""
    if isinstance(store, PostgresStore):
        return await PostgresSecretRows.open(store)
    return await SqliteSecretRows.open(store)


def describe(store: Store) -> str:
    """Where the store is, for logs and CLI output; a PostgreSQL password is never shown."""
    if isinstance(store, PostgresStore):
        return "postgresql " + redact(store.url)
    return f"sqlite {store.path}"


def redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
