"""TimescaleDB (real, or the double when none is installed) speaks the dialect we need.

Hypertables with a unique index, multi-row INSERTs (the double has no COPY FROM STDIN),
hierarchical continuous aggregates refreshed by hand (it has no background workers) and
compression. The double's one session is shared by the whole run, so each test works in
its own schema and drops it afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.integration

START = datetime(2025, 3, 1, tzinfo=UTC)
STEP = timedelta(seconds=30)
HOURS = 3
DEVICES = ("dev-a", "dev-b", "dev-c")
UNITS = {"humidity": "%", "temperature": "C"}
INSERT_BATCH_ROWS = 1000  # 6 parameters a row, well under PostgreSQL's 65535

Row = tuple[datetime, str, str, float, str, int]


def telemetry_rows(start: datetime, hours: int, batch_id: int) -> list[Row]:
    """Every device and metric every 30 s; values are multiples of 0.25, so sums are exact."""
    rows: list[Row] = []
    for step in range(int(timedelta(hours=hours) / STEP)):
        ts = start + step * STEP
        for d, device in enumerate(DEVICES):
            for m, (metric, unit) in enumerate(UNITS.items()):
                value = ((step * 37 + d * 11 + m * 5) % 400) / 4 - 20
                rows.append((ts, device, metric, value, unit, batch_id))
    return rows


@dataclass(frozen=True)
class Telemetry:
    conn: psycopg.Connection
    schema: str

    def ident(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def regclass(self, name: str) -> str:
        return f"{self.schema}.{name}"

    @property
    def table(self) -> sql.Identifier:
        return self.ident("telemetry")

    def insert(self, rows: Sequence[Row], *, on_conflict_do_nothing: bool = False) -> int:
        """Multi-row INSERTs; returns the number of rows inserted."""
        inserted = 0
        for at in range(0, len(rows), INSERT_BATCH_ROWS):
            batch = rows[at : at + INSERT_BATCH_ROWS]
            query = sql.SQL(
                "INSERT INTO {} (ts, device_id, metric, value, unit, batch_id) VALUES {}{}"
            ).format(
                self.table,
                sql.SQL(", ").join(sql.SQL("(%s, %s, %s, %s, %s, %s)") for _ in batch),
                sql.SQL(
                    " ON CONFLICT (device_id, metric, ts) DO NOTHING"
                    if on_conflict_do_nothing
                    else ""
                ),
            )
            inserted += self.conn.execute(query, [v for row in batch for v in row]).rowcount
        return inserted

    def rows(self, query: sql.Composable, params: Sequence[object] = ()) -> list[tuple]:
        return self.conn.execute(query, params).fetchall()

    def direct_rollup(self, bucket: str) -> list[tuple]:
        """What a continuous aggregate over ``bucket`` must hold, from the raw rows."""
        return self.rows(
            sql.SQL(
                "SELECT time_bucket({}::interval, ts) AS bucket, device_id, metric,"
                " count(*)::bigint, sum(value), min(value), max(value)"
                " FROM {} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
            ).format(sql.Literal(bucket), self.table)
        )

    def view_rows(self, name: str) -> list[tuple]:
        return self.rows(
            sql.SQL(
                "SELECT bucket, device_id, metric, n, total, min_value, max_value"
                " FROM {} ORDER BY 1, 2, 3"
            ).format(self.ident(name))
        )

    def refresh(
        self, name: str, start: datetime | None = None, end: datetime | None = None
    ) -> None:
        # Not in a transaction block: the connection is in autocommit.
        self.conn.execute(
            "CALL refresh_continuous_aggregate(%s::regclass, %s::timestamptz, %s::timestamptz)",
            [self.regclass(name), start, end],
        )

    def chunks(self) -> list[tuple[str, datetime, bool]]:
        return self.conn.execute(
            "SELECT format('%%I.%%I', chunk_schema, chunk_name), range_start, is_compressed"
            " FROM timescaledb_information.chunks"
            " WHERE hypertable_schema = %s AND hypertable_name = 'telemetry'"
            " ORDER BY range_start",
            [self.schema],
        ).fetchall()


@pytest.fixture
def ts_conn(timescaledb) -> Iterator[psycopg.Connection]:
    with timescaledb.connect(autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        yield conn


@pytest.fixture
def telemetry(ts_conn: psycopg.Connection) -> Iterator[Telemetry]:
    """An empty ``telemetry`` hypertable (1-hour chunks) in a schema of its own."""
    schema = f"t_{secrets.token_hex(6)}"
    ts_conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    t = Telemetry(ts_conn, schema)
    ts_conn.execute(
        sql.SQL(
            "CREATE TABLE {} (ts timestamptz NOT NULL, device_id text, metric text,"
            " value double precision, unit text, batch_id bigint)"
        ).format(t.table)
    )
    ts_conn.execute(
        "SELECT create_hypertable(%s::regclass, by_range('ts', INTERVAL '1 hour'))",
        [t.regclass("telemetry")],
    )
    ts_conn.execute(
        sql.SQL("CREATE UNIQUE INDEX {} ON {} (device_id, metric, ts)").format(
            sql.Identifier("telemetry_device_metric_ts"), t.table
        )
    )
    yield t
    ts_conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_hypertable_takes_multi_row_inserts_and_enforces_the_unique_index(telemetry):
    rows = telemetry_rows(START, HOURS, batch_id=1)
    assert telemetry.insert(rows) == len(rows) == HOURS * 120 * len(DEVICES) * len(UNITS)

    assert [start for _, start, _ in telemetry.chunks()] == [
        START + timedelta(hours=h) for h in range(HOURS)
    ]
    assert telemetry.insert(rows[:50], on_conflict_do_nothing=True) == 0
    with pytest.raises(psycopg.errors.UniqueViolation):
        telemetry.insert(rows[:1])
    count = telemetry.rows(sql.SQL("SELECT count(*) FROM {}").format(telemetry.table))
    assert count == [(len(rows),)]


def test_hierarchical_continuous_aggregates_match_a_direct_group_by(telemetry):
    telemetry.insert(telemetry_rows(START, HOURS, batch_id=1))
    telemetry.conn.execute(
        sql.SQL(
            "CREATE MATERIALIZED VIEW {}"
            " WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS"
            " SELECT time_bucket('1 minute', ts) AS bucket, device_id, metric,"
            " count(*) AS n, sum(value) AS total, min(value) AS min_value,"
            " max(value) AS max_value"
            " FROM {} GROUP BY bucket, device_id, metric"
            " WITH NO DATA"
        ).format(telemetry.ident("telemetry_1m"), telemetry.table)
    )
    telemetry.conn.execute(
        sql.SQL(
            "CREATE MATERIALIZED VIEW {}"
            " WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS"
            " SELECT time_bucket('1 hour', bucket) AS bucket, device_id, metric,"
            " sum(n)::bigint AS n, sum(total) AS total, min(min_value) AS min_value,"
            " max(max_value) AS max_value"
            " FROM {} GROUP BY 1, device_id, metric"
            " WITH NO DATA"
        ).format(telemetry.ident("telemetry_1h"), telemetry.ident("telemetry_1m"))
    )
    assert telemetry.view_rows("telemetry_1m") == []
    assert telemetry.view_rows("telemetry_1h") == []

    telemetry.refresh("telemetry_1m")
    telemetry.refresh("telemetry_1h")

    minutes = telemetry.view_rows("telemetry_1m")
    hours = telemetry.view_rows("telemetry_1h")
    assert len(minutes) == HOURS * 60 * len(DEVICES) * len(UNITS)
    assert len(hours) == HOURS * len(DEVICES) * len(UNITS)
    assert minutes == telemetry.direct_rollup("1 minute")
    assert hours == telemetry.direct_rollup("1 hour")
    assert {n for *_, n, _, _, _ in hours} == {120}

    # A later hour arrives: materialized_only views do not see it until refreshed.
    late_start = START + timedelta(hours=HOURS)
    late_end = late_start + timedelta(hours=1)
    telemetry.insert(telemetry_rows(late_start, 1, batch_id=2))
    assert telemetry.view_rows("telemetry_1m") == minutes
    assert telemetry.view_rows("telemetry_1h") == hours

    telemetry.refresh("telemetry_1m", late_start, late_end)
    telemetry.refresh("telemetry_1h", late_start, late_end)
    assert telemetry.view_rows("telemetry_1m") == telemetry.direct_rollup("1 minute")
    assert telemetry.view_rows("telemetry_1h") == telemetry.direct_rollup("1 hour")
    assert len(telemetry.view_rows("telemetry_1h")) == (HOURS + 1) * len(DEVICES) * len(UNITS)


def test_compressed_chunk_stays_readable(telemetry):
    rows = telemetry_rows(START, HOURS, batch_id=1)
    telemetry.insert(rows)
    everything = sql.SQL("SELECT * FROM {} ORDER BY ts, device_id, metric").format(telemetry.table)
    before = telemetry.rows(everything)
    rollup_before = telemetry.direct_rollup("10 minutes")

    telemetry.conn.execute(
        sql.SQL(
            "ALTER TABLE {} SET (timescaledb.compress,"
            " timescaledb.compress_segmentby = 'device_id')"
        ).format(telemetry.table)
    )
    oldest, _, compressed = telemetry.chunks()[0]
    assert not compressed
    # One statement per chunk: `SELECT compress_chunk(c) ... LIMIT 1` would compress every
    # chunk (the select list is computed before the sort and limit).
    telemetry.conn.execute("SELECT compress_chunk(%s::regclass)", [oldest])

    assert [compressed for *_, compressed in telemetry.chunks()] == [True] + [False] * (HOURS - 1)
    stats = telemetry.conn.execute(
        "SELECT compression_status FROM chunk_compression_stats(%s::regclass)"
        " WHERE format('%%I.%%I', chunk_schema, chunk_name) = %s",
        [telemetry.regclass("telemetry"), oldest],
    ).fetchall()
    assert stats == [("Compressed",)]

    assert telemetry.rows(everything) == before
    assert telemetry.direct_rollup("10 minutes") == rollup_before
    first_hour = telemetry.rows(
        sql.SQL(
            "SELECT count(*), sum(value) FROM {} WHERE device_id = %s AND ts >= %s AND ts < %s"
        ).format(telemetry.table),
        ["dev-b", START, START + timedelta(hours=1)],
    )
    expected = [r for r in rows if r[1] == "dev-b" and r[0] < START + timedelta(hours=1)]
    assert first_hour == [(len(expected), sum(r[3] for r in expected))]

    # The unique index still guards the compressed chunk.
    assert telemetry.insert(rows[:50], on_conflict_do_nothing=True) == 0
