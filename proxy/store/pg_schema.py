"""The PostgreSQL schema as numbered migrations, and the runner `seekgate db migrate` uses.

Why a runner of our own rather than yoyo-migrations or Alembic: both drive a synchronous DB-API
driver (psycopg2), which would be a second PostgreSQL client beside asyncpg for ~40 lines of
logic, and Alembic's value (autogenerating from ORM models) does not apply to hand-written SQL.
What a runner must get right is small and tested here: each migration runs in its own
transaction with its version row, under a transaction-level advisory lock, so replicas that
start together (`store.auto_migrate`) apply each step exactly once; applying is idempotent.

Migrations are append-only: a released one is never edited, a change is a new number.
"""

from __future__ import annotations

from typing import Any

# A fixed advisory-lock id ("seekgate" in ASCII, truncated to a bigint) serialising migrators.
LOCK_ID = 0x7365656B67617465 & 0x7FFFFFFFFFFFFFFF

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "keys, revision, expiry notices, envelope secrets, session denylist, crypto events", """
CREATE TABLE keys (
    key_id         TEXT PRIMARY KEY,
    secret_hash    TEXT NOT NULL,
    tier           TEXT NOT NULL,
    owner          TEXT NOT NULL,
    roles          JSONB NOT NULL DEFAULT '[]',
    labels         JSONB NOT NULL DEFAULT '{}',
    models         JSONB NOT NULL DEFAULT '[]',
    allowed_cidrs  JSONB NOT NULL DEFAULT '[]',
    parent_id      TEXT REFERENCES keys(key_id),
    prefix         TEXT NOT NULL DEFAULT '',
    last4          TEXT NOT NULL DEFAULT '',
    created_at     DOUBLE PRECISION NOT NULL,
    expires_at     DOUBLE PRECISION,
    revoked_at     DOUBLE PRECISION,
    limits         JSONB NOT NULL DEFAULT '{}',
    pepper_version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX keys_parent ON keys(parent_id);
CREATE INDEX keys_expiring ON keys(expires_at) WHERE revoked_at IS NULL;
-- 'revision' is the change sequence number: every committed change bumps it in the same transaction.
CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta(name, value) VALUES ('revision', 0);
CREATE TABLE expiry_notices (
    key_id       TEXT NOT NULL REFERENCES keys(key_id),
    expires_at   DOUBLE PRECISION NOT NULL,
    announced_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key_id, expires_at)
);
CREATE TABLE deks (
    dek_id     TEXT PRIMARY KEY,
    kek_id     TEXT NOT NULL,
    wrapped    BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    dek_id     TEXT NOT NULL REFERENCES deks(dek_id),
    blob       BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE revoked_sessions (jti TEXT PRIMARY KEY, revoked_at DOUBLE PRECISION NOT NULL);
CREATE TABLE crypto_events (name TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
"""),
    (2, "the shared audit index, partitioned by month, and each replica's indexing lag", """
-- Every replica's records (its JSONL file stays the durable record). Monthly partitions are made
-- on demand by audit/pg_index.py and dropped whole by retention; the key includes ts because a
-- partitioned table's unique keys must include its partition key.
CREATE TABLE audit_events (
    ts DOUBLE PRECISION NOT NULL,
    timestamp TEXT, event_id TEXT NOT NULL, request_id TEXT, actor TEXT, key_id TEXT, tier TEXT,
    action TEXT, resource TEXT, model TEXT, status TEXT, http_status INTEGER, reason TEXT, client_ip TEXT,
    duration_ms DOUBLE PRECISION, upstream_ms DOUBLE PRECISION, input_tokens INTEGER, output_tokens INTEGER,
    protocol TEXT, method TEXT, path TEXT, rule TEXT, parent_key_ids JSONB,
    replica TEXT NOT NULL,
    PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX audit_events_ts ON audit_events (ts);
CREATE INDEX audit_events_actor ON audit_events (actor, ts);
CREATE INDEX audit_events_key_id ON audit_events (key_id, ts);
-- What each replica has not indexed yet, refreshed by its indexer: the leak report shows the others' lag.
CREATE TABLE audit_replicas (
    replica        TEXT PRIMARY KEY,
    pending        INTEGER NOT NULL,
    oldest_pending DOUBLE PRECISION,
    indexed_at     DOUBLE PRECISION,
    heartbeat      DOUBLE PRECISION NOT NULL
);
"""),
    (3, "the audit index's openai and admin fields (what the SQLite index gained beside it)", """
-- Added to the partitioned parent: PostgreSQL adds them to every partition.
ALTER TABLE audit_events ADD COLUMN openai JSONB, ADD COLUMN admin JSONB;
"""),
    (4, "a rotated key names its successor, so it is rotated once (keys/lifecycle.py)", """
ALTER TABLE keys ADD COLUMN successor_id TEXT;
"""),
)

LATEST = MIGRATIONS[-1][0]

_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


async def schema_version(conn: Any) -> int:
    """The highest applied migration; 0 on an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def migrate(conn: Any) -> list[int]:
    """Apply every migration the database lacks, in order; the versions applied ([] if it was current).

    `conn` is an asyncpg connection. Safe to run from several processes at once.
    """
    applied: list[int] = []
    for version, name, sql in MIGRATIONS:
        async with conn.transaction():
            # Held to the end of this transaction: a second migrator waits here, then sees the row.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
            await conn.execute(_VERSIONS)
            done = await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version)
            if done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations(version, name) VALUES ($1, $2)", version, name)
            applied.append(version)
    return applied
