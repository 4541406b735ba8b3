"""Retention of the warehouse tables: what each growing table keeps, and one pass that
drops the rest (Dagster-free; ``iot_platform/defs/retention`` runs it on a schedule).

Two mechanisms, one result shape per table:

* TimescaleDB hypertables and continuous aggregates (``telemetry``, ``telemetry_1m``/``_1h``
  /``_1d``): a retention policy per relation, kept in line with the settings on every pass
  and then run at once (``CALL run_job``), so whole chunks are dropped — no row-by-row
  delete, no vacuum debt — and the pass can say which chunks and rows went. The policies
  also keep running in TimescaleDB's background workers when Dagster is down.
* Every other table, and everything on plain PostgreSQL: bounded batched deletes of the
  oldest rows (``DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT n))``, one short
  transaction per batch, row locks only — never a table-wide lock), until nothing older
  than the cutoff is left or the pass's time budget is spent; the next pass continues.

The settings and their rules (rollups keep at least as long as their source; the load
ledger at least as long as raw batches can be reloaded) are ``RetentionSettings``.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from iot_platform.settings import RetentionSettings
from iot_platform.warehouse.migrations import Dialect


@dataclass(frozen=True)
class Target:
    """A table, the time column its age is measured by, the RetentionSettings field that
    says how long it keeps rows, and whether TimescaleDB stores it in chunks."""

    table: str
    column: str
    setting: str
    chunked_on_timescale: bool = False


TARGETS: tuple[Target, ...] = (
    Target("telemetry", "ts", "telemetry", chunked_on_timescale=True),
    Target("telemetry_1m", "bucket", "telemetry_1m", chunked_on_timescale=True),
    Target("telemetry_1h", "bucket", "telemetry_1h", chunked_on_timescale=True),
    Target("telemetry_1d", "bucket", "telemetry_1d", chunked_on_timescale=True),
    Target("device_events", "ts", "device_events"),
    Target("decode_rejects", "received_at", "decode_rejects"),
    Target("device_health", "checked_at", "device_health"),
    # The load ledger and the (device_id, seq) claims: by when the batch was loaded
    # (never earlier than its messages were received, so it outlives the raw batch).
    Target("ingest_batches", "loaded_at", "ledger"),
    Target("device_messages", "received_at", "ledger"),
    Target("device_messages_1m", "minute", "ledger"),  # kept as long as what it summarises
)


@dataclass
class TableRetention:
    """What one pass did to one table."""

    table: str
    keep_days: float | None  # None: kept forever
    method: str  # "kept forever" | "batched delete" | "timescaledb retention policy"
    cutoff: dt.datetime | None = None
    rows_dropped: int = 0
    chunks_dropped: list[str] = field(default_factory=list)
    complete: bool = True  # False: the time budget ran out; the next pass continues
    job_id: int | None = None


def delete_oldest(
    conn: psycopg.Connection, table: str, column: str, before: dt.datetime, limit: int
) -> int:
    """Delete at most ``limit`` rows of ``table`` whose ``column`` is before ``before``.

    The inner SELECT stops at ``limit`` rows (found through the column's index), and the
    outer DELETE takes them by ``ctid``: a bounded statement with row locks only, however
    large the backlog is."""
    query = sql.SQL(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM {table} WHERE {column} < %s LIMIT %s))"
    ).format(table=sql.Identifier(table), column=sql.Identifier(column))
    return conn.execute(query, [before, limit]).rowcount


def _delete_in_batches(
    conn: psycopg.Connection,
    result: TableRetention,
    target: Target,
    *,
    batch_rows: int,
    deadline: float,
) -> None:
    assert result.cutoff is not None
    while True:
        with conn.transaction():
            deleted = delete_oldest(conn, target.table, target.column, result.cutoff, batch_rows)
        result.rows_dropped += deleted
        if deleted < batch_rows:
            return
        if time.monotonic() >= deadline:
            result.complete = False
            return


_FIND_JOB = """
    SELECT job_id, (config ->> %(key)s)::interval
    FROM timescaledb_information.jobs
    WHERE proc_name = %(proc)s AND (hypertable_schema, hypertable_name) IN (
        SELECT current_schema()::name, %(rel)s::name
        UNION ALL
        SELECT materialization_hypertable_schema, materialization_hypertable_name
        FROM timescaledb_information.continuous_aggregates
        WHERE view_schema = current_schema() AND view_name = %(rel)s)
"""


def sync_policy(
    conn: psycopg.Connection, relation: str, kind: str, after: dt.timedelta | None
) -> int | None:
    """Make ``relation``'s TimescaleDB ``kind`` policy ("retention" or "compression") say
    ``after`` (None: no policy); returns its job id. An unchanged policy is left alone, a
    changed one is replaced, so a new setting takes effect on the next pass."""
    key = "drop_after" if kind == "retention" else "compress_after"
    row = conn.execute(
        _FIND_JOB, {"key": key, "proc": f"policy_{kind}", "rel": relation}
    ).fetchone()
    if row is not None and row[1] == after:
        return int(row[0])
    if row is not None:
        conn.execute(
            sql.SQL("SELECT {}(%s::regclass, if_exists => true)").format(
                sql.Identifier(f"remove_{kind}_policy")
            ),
            [relation],
        )
    if after is None:
        return None
    added = conn.execute(
        sql.SQL("SELECT {}(%s::regclass, %s::interval)").format(
            sql.Identifier(f"add_{kind}_policy")
        ),
        [relation, after],
    ).fetchone()
    assert added is not None
    return int(added[0])


def _chunks(
    conn: psycopg.Connection, relation: str, older_than: dt.datetime | None = None
) -> dict[str, sql.Identifier]:
    """``relation``'s chunks (all, or those entirely older than ``older_than``)."""
    rows = conn.execute(
        """SELECT n.nspname, c.relname
           FROM show_chunks(%s::regclass, older_than => %s::timestamptz) AS s(chunk)
           JOIN pg_class c ON c.oid = s.chunk
           JOIN pg_namespace n ON n.oid = c.relnamespace""",
        [relation, older_than],
    ).fetchall()
    return {f"{schema}.{name}": sql.Identifier(schema, name) for schema, name in rows}


JOB_ATTEMPTS = 5


def _run_job(conn: psycopg.Connection, job_id: int) -> None:
    """``CALL run_job`` in the foreground. TimescaleDB's background workers may be running
    another policy on the same hypertable (compressing a chunk while this drops one); the
    server then aborts one of the two as a deadlock victim, and the victim tries again."""
    for attempt in range(1, JOB_ATTEMPTS + 1):
        try:
            conn.execute("CALL run_job(%s)", [job_id])
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
            if attempt == JOB_ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)


def _run_retention_policy(
    conn: psycopg.Connection, result: TableRetention, keep: dt.timedelta
) -> None:
    """Run ``result.table``'s retention policy now and record the chunks (and their rows)
    it dropped: the rows of the chunks older than the cutoff are counted before the job
    runs, the chunks that are gone after it are the ones reported."""
    job_id = sync_policy(conn, result.table, "retention", keep)
    assert job_id is not None  # a policy with an interval always has a job
    result.job_id = job_id
    doomed = _chunks(conn, result.table, older_than=result.cutoff)
    rows: dict[str, int] = {}
    for name, ident in doomed.items():
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
        rows[name] = int(count[0]) if count else 0
    _run_job(conn, job_id)
    remaining = _chunks(conn, result.table)
    result.chunks_dropped = sorted(name for name in doomed if name not in remaining)
    result.rows_dropped = sum(rows[name] for name in result.chunks_dropped)
    result.complete = len(result.chunks_dropped) == len(doomed)


def run_retention(
    conn: psycopg.Connection,
    dialect: Dialect,
    settings: RetentionSettings,
    *,
    now: dt.datetime | None = None,
) -> list[TableRetention]:
    """One retention pass over every table in TARGETS; ``conn`` must be in autocommit
    (each delete batch is its own transaction; ``run_job`` commits on its own).

    The time budget (``settings.max_seconds``) is shared: a table whose backlog is not
    cleared is marked incomplete and finished by the next pass."""
    if not conn.autocommit:
        raise ValueError("run_retention needs an autocommit connection")
    now = now or dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + settings.max_seconds
    results: list[TableRetention] = []
    for target in TARGETS:
        days: float | None = getattr(settings, target.setting)
        chunked = dialect is Dialect.TIMESCALE and target.chunked_on_timescale
        if days is None:
            result = TableRetention(target.table, None, "kept forever")
            if chunked:
                sync_policy(conn, target.table, "retention", None)
            results.append(result)
            continue
        keep = dt.timedelta(days=days)
        if chunked:
            result = TableRetention(
                target.table, days, "timescaledb retention policy", cutoff=now - keep
            )
            _run_retention_policy(conn, result, keep)
        else:
            result = TableRetention(target.table, days, "batched delete", cutoff=now - keep)
            _delete_in_batches(
                conn, result, target, batch_rows=settings.batch_rows, deadline=deadline
            )
        results.append(result)
    if dialect is Dialect.TIMESCALE:
        sync_policy(
            conn,
            "telemetry",
            "compression",
            dt.timedelta(days=settings.telemetry_compress_after),
        )
    return results
