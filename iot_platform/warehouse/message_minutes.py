"""``device_messages_1m``: per device and receive minute, the numbers the message health
rules count (messages, distinct seqs, lowest and highest seq, largest clock skew); its
definition is ``MINUTES_OF_MESSAGES`` (migration 13).

Why: ``sequence_gaps_duplicates`` and ``clock_skew`` used to read every ``device_messages``
row of their window at every evaluation, so their cost grew with the message rate times
the window (21 s and 3 s per evaluation over 36 million rows: 60 minutes at 10,000
msgs/s). The summary is recomputed once per minute of messages, beside the rollups and
under the same mark (``ingest_batches.rollups_refreshed_at``: set once every rollup and
this summary reflect the batch), and the rules read one row per device and minute.

Exactness: the rules read the summary only for the minutes that no unmarked batch
touches; the rest of their window (its first, partial minute; the minutes of batches
loaded since the last refresh) they read raw, with the same SELECT (health.py).
"""

from __future__ import annotations

import datetime as dt

import psycopg
from psycopg import sql

from iot_platform.warehouse.migrations import MINUTES_OF_MESSAGES

WIDTH = dt.timedelta(minutes=1)  # INTERVAL '1 minute' in the definition
# Two refreshes (two runs; a rollup step beside a following run) recompute a minute by
# delete + insert: serialised, so neither inserts a row the other has just inserted.
_REFRESH_LOCK_KEY = 0x10_7_5EC


def refresh_message_minutes(conn: psycopg.Connection, batch_ids: list[int]) -> int:
    """Recompute every receive minute that ``batch_ids`` touched, from all of its
    ``device_messages`` rows (other batches' too); returns how many minutes. Call it before
    marking those batches refreshed."""
    if not batch_ids:
        return 0
    span = conn.execute(
        """SELECT time_bucket(INTERVAL '1 minute', min(received_from)),
                  time_bucket(INTERVAL '1 minute', max(received_to)) + INTERVAL '1 minute'
           FROM ingest_batches WHERE batch_id = ANY(%s)""",
        [batch_ids],
    ).fetchone()
    if span is None or span[0] is None:  # no messages in those batches
        return 0
    lo, hi = span
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_REFRESH_LOCK_KEY])
        conn.execute(
            "DELETE FROM device_messages_1m WHERE minute >= %(lo)s AND minute < %(hi)s",
            {"lo": lo, "hi": hi},
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO device_messages_1m (minute, device_id, messages, distinct_seq, "
                "min_seq, max_seq, max_skew_s) " + MINUTES_OF_MESSAGES
            ).format(lo=sql.Placeholder("lo"), hi=sql.Placeholder("hi")),
            {"lo": lo, "hi": hi},
        )
    return (hi - lo) // WIDTH
