"""Warehouse retention on real PostgreSQL and on TimescaleDB (real, or the double).

Every table gets rows on both sides of its cutoff; a pass must drop exactly the old ones
(and say how many), keep the rest, stay within its batch size and time budget (carrying
on in the next pass), and on TimescaleDB drop whole chunks through policies that match
the settings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from iot_platform.defs.resources import WarehouseResource
from iot_platform.defs.retention.warehouse import CAUGHT_UP, warehouse_retention
from iot_platform.settings import RetentionSettings
from iot_platform.warehouse.aggregates import ROLLUPS, refresh
from iot_platform.warehouse.migrations import Dialect, migrate
from iot_platform.warehouse.retention import TARGETS, run_retention

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)
SETTINGS = RetentionSettings(
    telemetry=10,
    telemetry_1m=20,
    telemetry_1h=30,
    telemetry_1d=None,
    device_events=15,
    decode_rejects=5,
    device_health=3,
    ledger=12,
    telemetry_compress_after=7,
    batch_rows=50,
    max_seconds=60,
)
SPAN_DAYS = 40  # of seeded history, one row per hour per table (two for telemetry)


def _seed(conn: psycopg.Connection, now: dt.datetime, *, rollup_tables: bool) -> None:
    """Hourly rows from SPAN_DAYS ago until now in every table the pass looks after."""
    # Half an hour off the cutoffs: a pass a moment later (the asset reads the clock
    # itself) drops the same rows.
    span = [now - dt.timedelta(days=SPAN_DAYS, minutes=30), now]
    statements = [
        """INSERT INTO telemetry (ts, device_id, metric, value, unit, batch_id)
           SELECT g, d, 'voltage_dc', 700, 'V', 1 FROM {hours},
                  unnest(ARRAY['dev-a', 'dev-b']) AS d""",
        """INSERT INTO device_events (ts, device_id, msg_type, seq, body, received_at, batch_id)
           SELECT g, 'dev-a', 'hello', 1, '{{}}', g, 1 FROM {hours}""",
        """INSERT INTO decode_rejects (batch_key, batch_id, received_at, topic, reason, detail,
                                       payload_excerpt)
           SELECT 'k', 1, g, 't', 'malformed_json', '', '' FROM {hours}""",
        """INSERT INTO device_health (checked_at, device_id, check_name, status)
           SELECT g, 'dev-a', 'silent_devices', 'ok' FROM {hours}""",
        """INSERT INTO ingest_batches (object_key, partition_key, raw_rows, telemetry_rows,
                                       event_rows, reject_rows, duplicate_rows, loaded_at)
           SELECT 'raw/' || g::text, 'p', 1, 1, 0, 0, 0, g FROM {hours}""",
        """INSERT INTO device_messages (device_id, seq, ts, received_at, msg_type, batch_id)
           SELECT 'dev-a', 1, g, g, 'telemetry', 1 FROM {hours}""",
        """INSERT INTO device_messages_1m (minute, device_id, messages, distinct_seq, min_seq,
                                           max_seq, max_skew_s)
           SELECT g, 'dev-a', 1, 1, 1, 1, 0 FROM {hours}""",
    ]
    if rollup_tables:  # plain PostgreSQL: the rollups are tables of their own
        statements += [
            """INSERT INTO {rollup} (bucket, device_id, metric, count, sum, avg, min, max,
                                     first, last)
               SELECT g, 'dev-a', 'voltage_dc', 1, 1, 1, 1, 1, 1, 1 FROM {hours}"""
        ]
    hours = sql.SQL("generate_series(%s::timestamptz, %s::timestamptz, interval '1 hour') AS g")
    for statement in statements:
        for rollup in ROLLUPS if "{rollup}" in statement else [""]:
            query = sql.SQL(statement).format(hours=hours, rollup=sql.Identifier(rollup or "-"))
            conn.execute(query, span)


def _counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        t.table: conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t.table))
        ).fetchone()[0]
        for t in TARGETS
    }


def _older_than(conn: psycopg.Connection, table: str, column: str, cutoff: dt.datetime) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE {} < %s").format(
        sql.Identifier(table), sql.Identifier(column)
    )
    return conn.execute(query, [cutoff]).fetchone()[0]


@pytest.fixture
def plain(postgres_db) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        assert migrate(conn, "postgresql")[0] is Dialect.POSTGRES
        yield conn


def test_plain_postgres_drops_exactly_the_old_rows_of_every_table(plain):
    now = dt.datetime.now(dt.UTC)
    _seed(plain, now, rollup_tables=True)
    before = _counts(plain)
    expected = {}
    for target in TARGETS:
        days = getattr(SETTINGS, target.setting)
        cutoff = now - days * DAY if days else None
        expected[target.table] = (
            _older_than(plain, target.table, target.column, cutoff) if cutoff else 0
        )
    assert expected["telemetry"] == 2 * (24 * (SPAN_DAYS - 10) + 1)  # the seed is as meant

    results = {r.table: r for r in run_retention(plain, Dialect.POSTGRES, SETTINGS, now=now)}

    after = _counts(plain)
    for target in TARGETS:
        r = results[target.table]
        assert (
            r.rows_dropped == expected[target.table] == before[target.table] - after[target.table]
        ), target.table
        assert r.complete and r.chunks_dropped == []
        if r.cutoff is not None:
            assert r.method == "batched delete"
            assert _older_than(plain, target.table, target.column, r.cutoff) == 0
    assert results["telemetry_1d"].method == "kept forever"
    assert after["telemetry_1d"] == before["telemetry_1d"]
    # A second pass finds nothing more.
    again = run_retention(plain, Dialect.POSTGRES, SETTINGS, now=now)
    assert [r.rows_dropped for r in again] == [0] * len(TARGETS)


def test_a_pass_stops_at_its_time_budget_and_the_next_one_carries_on(plain):
    now = dt.datetime.now(dt.UTC)
    _seed(plain, now, rollup_tables=True)
    old = _older_than(plain, "telemetry", "ts", now - SETTINGS.telemetry * DAY)
    tight = dataclasses.replace(SETTINGS, batch_rows=7, max_seconds=1e-9)

    first = {r.table: r for r in run_retention(plain, Dialect.POSTGRES, tight, now=now)}
    # The budget is spent after the first batch of each table: 7 rows, and flagged.
    assert first["telemetry"].rows_dropped == 7 and not first["telemetry"].complete
    passes = 1
    dropped = first["telemetry"].rows_dropped
    while True:
        result = {r.table: r for r in run_retention(plain, Dialect.POSTGRES, tight, now=now)}
        passes += 1
        dropped += result["telemetry"].rows_dropped
        if result["telemetry"].complete:
            break
    assert dropped == old
    assert passes == old // 7 + 1


def test_the_asset_records_what_it_dropped(plain, postgres_db, monkeypatch):
    now = dt.datetime.now(dt.UTC)
    _seed(plain, now, rollup_tables=True)
    old_events = _older_than(plain, "device_events", "ts", now - 90 * DAY)  # default: 90 days
    assert old_events == 0  # 40 days of history: nothing is old enough by default
    monkeypatch.setenv("IOT_RETENTION_DEVICE_EVENTS_DAYS", "15")
    monkeypatch.setenv("IOT_RETENTION_DECODE_REJECTS_DAYS", "0")  # forever
    old_events = _older_than(plain, "device_events", "ts", now - 15 * DAY)
    rejects = _counts(plain)["decode_rejects"]
    params = psycopg.conninfo.conninfo_to_dict(postgres_db)
    resource = WarehouseResource(
        host=str(params["host"]),
        port=int(params["port"]),
        user=str(params["user"]),
        password=str(params["password"]),
        dbname=str(params["dbname"]),
    )

    result = dg.materialize([warehouse_retention], resources={"warehouse": resource})

    assert result.success
    (materialization,) = result.asset_materializations_for_node("lifecycle__warehouse_retention")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["device_events_rows_dropped"] == old_events > 0
    assert metadata["decode_rejects_rows_dropped"] == 0
    assert _counts(plain)["decode_rejects"] == rejects
    assert metadata["rows_dropped"] == sum(
        v for k, v in metadata.items() if k.endswith("_rows_dropped")
    )
    assert "| device_events | 15 | batched delete |" in metadata["tables"]
    assert metadata["dialect"] == "postgresql"
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == CAUGHT_UP and check.passed


# ---- TimescaleDB (real when IOT_TEST_PG_BINDIR has it, else the double) ----------------


@pytest.fixture
def timescale(timescaledb) -> Iterator[psycopg.Connection]:
    """A migrated TimescaleDB warehouse in a schema of its own, dropped afterwards."""
    with timescaledb.schema("wh") as (conn, _schema):
        assert migrate(conn, "timescaledb")[0] is Dialect.TIMESCALE
        conn.commit()
        conn.autocommit = True
        yield conn


def _policies(conn: psycopg.Connection) -> dict[tuple[str, str], dt.timedelta]:
    """(relation, proc) -> interval, for this schema's tables and continuous aggregates."""
    rows = conn.execute(
        """SELECT coalesce(c.view_name, j.hypertable_name), j.proc_name,
                  coalesce(j.config ->> 'drop_after', j.config ->> 'compress_after')::interval
           FROM timescaledb_information.jobs j
           LEFT JOIN timescaledb_information.continuous_aggregates c
             ON (j.hypertable_schema, j.hypertable_name)
              = (c.materialization_hypertable_schema, c.materialization_hypertable_name)
           WHERE j.proc_name IN ('policy_retention', 'policy_compression')
             AND current_schema() IN (j.hypertable_schema, c.view_schema)"""
    ).fetchall()
    return {(name, proc): interval for name, proc, interval in rows}


def test_timescaledb_drops_whole_chunks_through_policies_that_match_the_settings(timescale):
    now = dt.datetime.now(dt.UTC)
    _seed(timescale, now, rollup_tables=False)
    lo, hi = timescale.execute("SELECT min(ts), max(ts) FROM telemetry").fetchone()
    for name in ROLLUPS:
        refresh(timescale, Dialect.TIMESCALE, name, lo, hi)
    before = _counts(timescale)
    assert before["telemetry_1h"] == 2 * (SPAN_DAYS * 24 + 1)  # two devices

    results = {r.table: r for r in run_retention(timescale, Dialect.TIMESCALE, SETTINGS, now=now)}

    after = _counts(timescale)
    telemetry = results["telemetry"]
    assert telemetry.method == "timescaledb retention policy" and telemetry.complete
    # One-day chunks: everything before the cutoff's day went, whole days at a time.
    cutoff_day = now.replace(hour=0, minute=0, second=0, microsecond=0) - 10 * DAY
    oldest = timescale.execute("SELECT min(ts) FROM telemetry").fetchone()[0]
    assert cutoff_day <= oldest < cutoff_day + dt.timedelta(hours=1)  # hourly rows
    # One chunk per UTC day of rows before that day: 30, or 31 when the seed's first row
    # (half an hour before SPAN_DAYS ago) fell on the day before, as it does just after 00:00.
    first_day = lo.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert len(telemetry.chunks_dropped) == (cutoff_day - first_day).days
    for name in ("telemetry", "telemetry_1m", "telemetry_1h"):
        r = results[name]
        assert r.rows_dropped == before[name] - after[name], name
        assert r.job_id is not None
    assert results["telemetry_1m"].chunks_dropped  # 40 days of minutes span several chunks
    assert results["telemetry_1d"].method == "kept forever"
    assert after["telemetry_1d"] == before["telemetry_1d"]
    for name in ("device_events", "decode_rejects", "device_health", "ingest_batches"):
        r = results[name]
        assert r.method == "batched delete" and r.rows_dropped == before[name] - after[name] > 0
    assert _policies(timescale) == {
        ("telemetry", "policy_retention"): 10 * DAY,
        ("telemetry_1m", "policy_retention"): 20 * DAY,
        ("telemetry_1h", "policy_retention"): 30 * DAY,
        ("telemetry", "policy_compression"): 7 * DAY,
    }

    # New settings replace the policies; "forever" removes one; nothing is left to drop.
    changed = dataclasses.replace(
        SETTINGS, telemetry_1h=None, telemetry_1m=25, telemetry_compress_after=2
    )
    again = run_retention(timescale, Dialect.TIMESCALE, changed, now=now)
    assert {r.table: r.rows_dropped for r in again}["telemetry"] == 0
    assert _policies(timescale) == {
        ("telemetry", "policy_retention"): 10 * DAY,
        ("telemetry_1m", "policy_retention"): 25 * DAY,
        ("telemetry", "policy_compression"): 2 * DAY,
    }
