"""The run-time database on PostgreSQL (cluster mode: the workers' shared journal): the same
tables and columns as SQLite's SCHEMA (storage/store.py; tests/test_postgres_journal.py holds
them equal), in PostgreSQL's types, and the SQL dialect helper both PostgreSQL modules use.

Types: REAL is `double precision`; ids, byte counts and counters are `bigint`; control and
fingerprint stay TEXT holding JSON, so a row reads back as the same tuple on both. `jobs.id`
has no default: the workers take ids from the sequence `job_ids` in blocks
(PostgresBackend.reserve), and push ids come from `push_ids` the same way. `meta` (PostgreSQL
only; SQLite keeps its version in PRAGMA user_version) holds the row `schema_version`.

Migrations: `SCHEMA_VERSION` is SQLite's (store.py), so one number names one shape on both.
PostgreSQL starts at 5; a later version adds its step to `MIGRATIONS` (from-version -> DDL),
applied in order under the advisory lock `DDL_LOCK`, so workers starting together migrate once.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from otacore.storage.store import SCHEMA_VERSION

# pg_advisory_xact_lock keys: schema changes, and reserving blocks of a sequence.
DDL_LOCK = 0x07A5_0001
RESERVE_LOCK = 0x07A5_0002
SEQUENCES = ("job_ids", "push_ids")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_versions (
    product_key TEXT NOT NULL, device_name TEXT NOT NULL, module TEXT NOT NULL,
    version TEXT NOT NULL, reported_at double precision NOT NULL,
    part INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (product_key, device_name, module));
CREATE INDEX IF NOT EXISTS device_versions_by_part ON device_versions (part);
CREATE TABLE IF NOT EXISTS batches (
    name TEXT PRIMARY KEY, package_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL, created_at double precision NOT NULL, started_at double precision,
    ended_at double precision, reason TEXT NOT NULL DEFAULT '', control TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS batch_targets (
    batch TEXT NOT NULL, product_key TEXT NOT NULL, device_name TEXT NOT NULL,
    PRIMARY KEY (batch, product_key, device_name));
CREATE TABLE IF NOT EXISTS jobs (
    id bigint PRIMARY KEY, batch TEXT NOT NULL,
    product_key TEXT NOT NULL, device_name TEXT NOT NULL, module TEXT NOT NULL,
    package_id TEXT NOT NULL, from_version TEXT NOT NULL, target_version TEXT NOT NULL,
    state TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, code INTEGER,
    message TEXT NOT NULL DEFAULT '', file_key TEXT NOT NULL DEFAULT '', file_size bigint NOT NULL DEFAULT 0,
    bytes_served bigint NOT NULL DEFAULT 0, created_at double precision NOT NULL,
    updated_at double precision NOT NULL, superseded INTEGER NOT NULL DEFAULT 0,
    part INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_by_device ON jobs (product_key, device_name, module);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch, state);
CREATE INDEX IF NOT EXISTS jobs_by_part ON jobs (part);
CREATE TABLE IF NOT EXISTS job_events (
    id bigserial PRIMARY KEY, job_id bigint NOT NULL REFERENCES jobs(id),
    at double precision NOT NULL, from_state TEXT, to_state TEXT NOT NULL, progress INTEGER, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS package_status (
    package_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at double precision NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '');
CREATE SEQUENCE IF NOT EXISTS job_ids;
CREATE SEQUENCE IF NOT EXISTS push_ids;
"""

# schema version -> the DDL that takes it to the next one (none yet: PostgreSQL began at 5).
MIGRATIONS: dict[int, str] = {}

_PARAM = re.compile(r"\?")


def pg_sql(sql: str) -> str:
    """SQLite's statement text (`?` parameters, INSERT OR IGNORE) as PostgreSQL's ($1, $2, ...,
    ON CONFLICT DO NOTHING). Our statements hold no `?` inside string literals."""
    numbers = iter(range(1, 1 << 16))
    text = _PARAM.sub(lambda _: f"${next(numbers)}", sql)
    if text.startswith("INSERT OR IGNORE INTO "):
        text = "INSERT INTO " + text[len("INSERT OR IGNORE INTO "):] + " ON CONFLICT DO NOTHING"
    return text


def shown_dsn(dsn: str) -> str:
    """The DSN for messages and logs: without its password."""
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else f"***@{netloc}"))
    except ValueError:
        return "the PostgreSQL DSN"


def removed_batches_sql() -> str:
    """Batches whose finished history is not loaded: canceled, or marked removed (SQLite:
    `json_extract(control, '$.removed') = 1`, true or 1)."""
    return ("SELECT name FROM batches WHERE state = 'canceled' OR "
            "(control::jsonb ->> 'removed') IN ('true', '1')")


__all__ = ["DDL_LOCK", "MIGRATIONS", "RESERVE_LOCK", "SCHEMA", "SCHEMA_VERSION", "SEQUENCES", "pg_sql", "shown_dsn",
           "removed_batches_sql"]
