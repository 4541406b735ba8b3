"""Plain-PostgreSQL rollups against a reference computed in Python from the raw rows.

first and last must be the values at the earliest and latest time of each bucket, exactly,
whatever order the rows were stored in: the refresh finds them by time, not by position.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from iot_platform.warehouse.aggregates import ROLLUPS, refresh
from iot_platform.warehouse.migrations import Dialect, migrate

pytestmark = pytest.mark.integration

UTC = dt.UTC
Row = tuple[dt.datetime, str, str, float]  # ts, device_id, metric, value

BUCKET_START: dict[str, Callable[[dt.datetime], dt.datetime]] = {
    "telemetry_1m": lambda ts: ts.replace(second=0, microsecond=0),
    "telemetry_1h": lambda ts: ts.replace(minute=0, second=0, microsecond=0),
    "telemetry_1d": lambda ts: ts.replace(hour=0, minute=0, second=0, microsecond=0),
}


def _rows(seed: int = 7) -> list[Row]:
    """Several series over minute, hour and day boundaries, µs-precise and unique times per
    series, negative and positive values, one single-row bucket; shuffled."""
    rng = random.Random(seed)
    spans = [  # (first time, seconds covered) of a run of rows
        (dt.datetime(2026, 11, 22, 22, 10, 5, tzinfo=UTC), 50),
        (dt.datetime(2026, 11, 22, 23, 58, 30, tzinfo=UTC), 210),  # into the next day
        (dt.datetime(2026, 11, 23, 1, 0, 0, 123, tzinfo=UTC), 1),
    ]
    rows: list[Row] = []
    for device in ("dev-a", "dev-b", "dev-c"):
        for metric in ("temp", "voltage_dc"):
            for start, seconds in spans:
                count = 1 if seconds == 1 else rng.randint(40, 80)
                offsets = rng.sample(range(seconds * 10**6), count)  # distinct times
                rows += [
                    (start + dt.timedelta(microseconds=us), device, metric, rng.uniform(-500, 500))
                    for us in offsets
                ]
    rng.shuffle(rows)
    return rows


def _reference(rows: list[Row], name: str) -> dict[tuple, tuple]:
    """(bucket, device, metric) -> (count, sum, avg, min, max, first, last), straightforwardly."""
    groups: dict[tuple, list[tuple[dt.datetime, float]]] = defaultdict(list)
    for ts, device, metric, value in rows:
        groups[(BUCKET_START[name](ts), device, metric)].append((ts, value))
    out = {}
    for key, points in groups.items():
        points.sort()
        values = [value for _, value in points]
        total = math.fsum(values)
        out[key] = (
            len(values),
            total,
            total / len(values),
            min(values),
            max(values),
            points[0][1],
            points[-1][1],
        )
    return out


def _stored(conn: psycopg.Connection, name: str) -> dict[tuple, tuple]:
    query = sql.SQL(
        "SELECT bucket, device_id, metric, count, sum, avg, min, max, first, last FROM {}"
    ).format(sql.Identifier(name))
    return {tuple(row[:3]): tuple(row[3:]) for row in conn.execute(query)}


def _assert_matches(got: dict[tuple, tuple], expected: dict[tuple, tuple], name: str) -> None:
    assert got.keys() == expected.keys(), name
    for key, want in expected.items():
        count, total, avg, low, high, first, last = got[key]
        # Exact: count, min, max, first, last. The sums are float sums in some row order.
        assert (count, low, high, first, last) == (want[0], *want[3:]), (name, key)
        assert total == pytest.approx(want[1], rel=1e-12, abs=1e-9), (name, key)
        assert avg == pytest.approx(want[2], rel=1e-12, abs=1e-9), (name, key)


def _insert(conn: psycopg.Connection, rows: list[Row]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry (ts, device_id, metric, value, batch_id)"
            " VALUES (%s, %s, %s, %s, 1)",
            rows,
        )
    conn.commit()


def _refresh_all(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime) -> None:
    for name in ROLLUPS:
        refresh(conn, Dialect.POSTGRES, name, start, end)


@pytest.fixture
def warehouse(postgres_db) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_db) as conn:
        assert migrate(conn, "postgresql")[0] is Dialect.POSTGRES
        yield conn


def test_rollups_equal_a_reference_computed_from_shuffled_rows(warehouse):
    rows = _rows()
    _insert(warehouse, rows)
    _refresh_all(warehouse, min(r[0] for r in rows), max(r[0] for r in rows))
    for name in ROLLUPS:
        expected = _reference(rows, name)
        assert len(expected) > 6, name  # several buckets per series
        _assert_matches(_stored(warehouse, name), expected, name)


def test_a_refresh_after_rows_went_away_moves_first_and_last(warehouse):
    """A reload can remove a bucket's earliest and latest rows: the delete + insert refresh
    must then report the next ones, in every rollup above."""
    rows = _rows(seed=11)
    _insert(warehouse, rows)
    _refresh_all(warehouse, min(r[0] for r in rows), max(r[0] for r in rows))
    minute = dt.datetime(2026, 11, 22, 23, 59, tzinfo=UTC)
    in_minute = sorted(
        r
        for r in rows
        if r[1:3] == ("dev-b", "temp") and minute <= r[0] < minute + dt.timedelta(minutes=1)
    )
    gone = {in_minute[0], in_minute[-1]}
    assert len(in_minute) > 2
    warehouse.execute(
        "DELETE FROM telemetry WHERE device_id = 'dev-b' AND metric = 'temp' AND ts = ANY(%s)",
        [[r[0] for r in gone]],
    )
    warehouse.commit()
    _refresh_all(warehouse, minute, minute)
    kept = [r for r in rows if r not in gone]
    for name in ROLLUPS:
        _assert_matches(_stored(warehouse, name), _reference(kept, name), name)
    got = _stored(warehouse, "telemetry_1m")[(minute, "dev-b", "temp")]
    assert got[5:] == (in_minute[1][3], in_minute[-2][3])
