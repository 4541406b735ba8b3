"""The message health rules read ``device_messages_1m`` where it reflects every message and
raw rows elsewhere: their findings equal those of the direct queries over every message of
the window, whatever part of the window is summarised, unmarked or reloaded."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator

import psycopg
import pytest

from iot_platform.health import RULES, Evaluation, HealthBounds, HealthSettings, RuleResult
from iot_platform.warehouse.aggregates import mark_refreshed
from iot_platform.warehouse.migrations import Dialect, migrate

pytestmark = pytest.mark.integration

RULE = {rule.name: rule for rule in RULES}
SETTINGS = HealthSettings(
    window=dt.timedelta(minutes=12, seconds=17),  # starts inside a minute
    clock_skew_s=120,
    duplicate_rate=0.01,
    reject_rate=0.05,
    bounds=HealthBounds.merged(""),
    pipeline_lag=dt.timedelta(minutes=2),
)
START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
MINUTES = 20
BATCH_S = 10

# The rules as they were before the summary: every message of the window, read directly.
DIRECT_SEQUENCE = """
    WITH per_device AS (
        SELECT device_id, count(*) AS messages, count(DISTINCT seq) AS distinct_seq,
               max(seq) - min(seq) + 1 AS span
        FROM device_messages WHERE received_at >= %(since)s GROUP BY 1)
    SELECT device_id, jsonb_build_object(
               'messages', messages, 'missing_seq', span - distinct_seq,
               'duplicates', messages - distinct_seq,
               'duplicate_rate', round((messages - distinct_seq)::numeric / messages, 4))
    FROM per_device
    WHERE span > distinct_seq OR (messages - distinct_seq)::float8 / messages > %(rate)s
    ORDER BY 1"""
DIRECT_CLOCK_SKEW = """
    SELECT device_id, jsonb_build_object(
               'skewed_messages', count(*),
               'max_skew_s', round(max(abs(extract(epoch FROM received_at - ts)))::numeric, 1),
               'limit_s', %(limit)s::float8)
    FROM device_messages
    WHERE received_at >= %(since)s AND abs(extract(epoch FROM received_at - ts)) > %(limit)s
    GROUP BY device_id ORDER BY 1"""


def _traffic(rng: random.Random) -> list[tuple[str, int, dt.datetime, dt.datetime]]:
    """(device_id, seq, ts, received_at): devices counting up every 2 s, with the faults
    the rules look for and the ones that make minutes' seq ranges overlap."""
    rows = []
    for device in ("clean", "gaps", "dup-now", "dup-later", "restart", "skewed", "wobbly"):
        seq = 0
        for step in range(MINUTES * 30):
            received = START + dt.timedelta(seconds=2 * step, microseconds=rng.randrange(10**6))
            seq += 1
            if device == "gaps" and rng.random() < 0.02:
                seq += rng.randrange(1, 4)
            if device == "restart" and step == MINUTES * 15:
                seq = 1  # a reboot: the counter starts again
            skew = dt.timedelta(seconds=300) if device == "skewed" and step % 97 == 0 else 0
            ts = received - (skew or dt.timedelta(milliseconds=rng.randrange(500)))
            if device == "wobbly":  # a clock skew close to the limit, both ways
                ts = received + dt.timedelta(seconds=rng.uniform(-121, 121))
            rows.append((device, seq, ts, received))
            if device == "dup-now" and rng.random() < 0.05:  # a QoS 1 redelivery
                rows.append((device, seq, ts, received + dt.timedelta(milliseconds=300)))
            if device == "dup-later" and step % 101 == 0:  # the same message minutes later
                rows.append((device, seq, ts, received + dt.timedelta(minutes=3)))
    return rows


def _store(conn: psycopg.Connection, rows: list[tuple]) -> list[int]:
    """One batch per BATCH_S of receive time, as the loader stores them; returns their ids."""
    batches: dict[int, list[tuple]] = {}
    for row in rows:
        batches.setdefault(int((row[3] - START).total_seconds()) // BATCH_S, []).append(row)
    ids = []
    for n, batch in sorted(batches.items()):
        received = [r[3] for r in batch]
        ids.append(_insert_batch(conn, f"raw/b{n}", batch, min(received), max(received)))
    return ids


def _insert_batch(conn, key: str, rows: list[tuple], received_from, received_to) -> int:
    batch_id = conn.execute(
        """INSERT INTO ingest_batches (object_key, partition_key, raw_rows, telemetry_rows,
               event_rows, reject_rows, duplicate_rows, received_from, received_to,
               dagster_run_id)
           VALUES (%s, 'p', 0, 0, 0, 0, 0, %s, %s, 'r') RETURNING batch_id""",
        [key, received_from, received_to],
    ).fetchone()[0]
    with conn.cursor() as cursor:
        cursor.executemany(
            """INSERT INTO device_messages (device_id, seq, ts, received_at, msg_type, batch_id)
               VALUES (%s, %s, %s, %s, 'telemetry', %s)""",
            [(*row, batch_id) for row in rows],
        )
    return batch_id


def _reload(conn: psycopg.Connection, batch_id: int, drop: int) -> None:
    """What the loader does to a reloaded batch: its rows replaced (here ``drop`` fewer),
    its mark cleared."""
    rows = conn.execute(
        "DELETE FROM device_messages WHERE batch_id = %s RETURNING device_id, seq, ts, received_at",
        [batch_id],
    ).fetchall()
    with conn.cursor() as cursor:
        cursor.executemany(
            """INSERT INTO device_messages (device_id, seq, ts, received_at, msg_type, batch_id)
               VALUES (%s, %s, %s, %s, 'telemetry', %s)""",
            [(*row, batch_id) for row in rows[drop:]],
        )
    conn.execute(
        "UPDATE ingest_batches SET rollups_refreshed_at = NULL WHERE batch_id = %s", [batch_id]
    )


def _direct(conn: psycopg.Connection, query: str, now: dt.datetime) -> dict:
    params = {
        "since": now - SETTINGS.window,
        "rate": SETTINGS.duplicate_rate,
        "limit": SETTINGS.clock_skew_s,
    }
    return dict(conn.execute(query, params).fetchall())


def _rules(conn: psycopg.Connection, now: dt.datetime) -> dict[str, RuleResult]:
    """Both rules in one evaluation, as the health checks run them (one message_totals)."""
    evaluation = Evaluation(conn, SETTINGS, now)
    return {name: evaluation.run(RULE[name]) for name in ("sequence_gaps_duplicates", "clock_skew")}


@pytest.fixture
def warehouse(postgres_db) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        assert migrate(conn, "postgresql")[0] is Dialect.POSTGRES
        conn.execute(
            "INSERT INTO devices (device_id) SELECT unnest(%s::text[])",
            [["clean", "gaps", "dup-now", "dup-later", "restart", "skewed", "wobbly"]],
        )
        yield conn


def test_rules_over_the_summary_equal_the_rules_over_every_message(warehouse):
    rng = random.Random(11)
    ids = _store(warehouse, _traffic(rng))
    end = START + dt.timedelta(minutes=MINUTES)

    def check(now: dt.datetime) -> dict[str, RuleResult]:
        results = _rules(warehouse, now)
        assert results["sequence_gaps_duplicates"].failing == _direct(
            warehouse, DIRECT_SEQUENCE, now
        )
        assert results["clock_skew"].failing == _direct(warehouse, DIRECT_CLOCK_SKEW, now)
        return results

    # Nothing summarised yet: every minute is read raw.
    results = check(end)
    assert set(results["sequence_gaps_duplicates"].failing) == {
        "gaps",
        "dup-now",
        "dup-later",
        "restart",
    }
    # (dup-later's copies arrive 3 minutes after their ts)
    assert set(results["clock_skew"].failing) == {"skewed", "wobbly", "dup-later"}
    # As a following run goes: most batches marked (minutes refreshed), the newest not,
    # batches marked out of order, one reloaded after its minutes were summarised.
    marked = ids[: len(ids) * 4 // 5]
    rng.shuffle(marked)
    for part in (marked[: len(marked) // 2], marked[len(marked) // 2 :]):
        assert mark_refreshed(warehouse, "r", part) == len(part)
    _reload(warehouse, ids[len(ids) // 2], drop=3)
    for now in (end, end - dt.timedelta(minutes=4, seconds=31), end + dt.timedelta(seconds=59)):
        check(now)
    # Everything summarised: the rules read no raw minute but the window's first.
    assert mark_refreshed(warehouse, "r", ids) == len(ids) - len(marked) + 1
    for now in (end, end - dt.timedelta(minutes=7, seconds=3)):
        check(now)
    summary = warehouse.execute("SELECT sum(messages) FROM device_messages_1m").fetchone()[0]
    assert summary == warehouse.execute("SELECT count(*) FROM device_messages").fetchone()[0]


def test_a_stale_summary_is_never_trusted_for_unmarked_minutes(warehouse):
    """New messages land in minutes already summarised (a late batch): until its batch is
    marked, the rules read those minutes raw and still count it."""
    ids = _store(warehouse, _traffic(random.Random(5)))
    mark_refreshed(warehouse, "r", ids)
    late = START + dt.timedelta(minutes=MINUTES - 2, seconds=5)
    # clean's seqs 451-455 came at minute 15: 5 duplicates, above the 1 % rate
    copies = [("clean", seq, late, late) for seq in range(451, 456)]
    _insert_batch(warehouse, "raw/late", copies, late, late)
    now = START + dt.timedelta(minutes=MINUTES)
    found = _rules(warehouse, now)["sequence_gaps_duplicates"].failing
    assert found["clean"]["duplicates"] == 5
    assert found == _direct(warehouse, DIRECT_SEQUENCE, now)
    # A rule that trusted every summary row would have missed it.
    warehouse.execute("UPDATE ingest_batches SET rollups_refreshed_at = now()")
    assert "clean" not in _rules(warehouse, now)["sequence_gaps_duplicates"].failing
