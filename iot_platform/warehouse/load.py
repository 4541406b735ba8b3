"""Load decoded raw batches into the warehouse: bulk, set-based, idempotent (DESIGN §6).

Per batch, in ONE transaction: delete the rows a previous load of the same object key
wrote (so a decoder fix + backfill corrects data and a retry never double-counts), stage
the new rows in bulk, insert them with one set-based statement per table (conflicts on
(device_id, metric, ts) keep the first row: at-least-once delivery repeats messages across
batches), write the ledger row and move ``devices.last_seen`` forward (receive time of
accepted messages that are not retained replays, see ``device_activity``).

Bulk staging is binary COPY (Arrow encoded by pgpq); a server without COPY FROM STDIN (the
TimescaleDB test double) gets the same rows through ``unnest`` of arrays instead.

De-duplication on (device_id, seq) does not depend on batching: a telemetry envelope whose
(device_id, seq) a batch stored earlier already holds is dropped and counted (first stored
wins, ``_drop_claimed``); within a batch the decoder applies the same rule.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import errors, sql

from iot_platform.decode import (
    DEFAULT_TS_WINDOW,
    EVENTS_SCHEMA,
    MESSAGES_SCHEMA,
    REJECTS_SCHEMA,
    TELEMETRY_SCHEMA,
    UTC_US,
    DecodedFrames,
    TsWindow,
    decode_raw,
)
from iot_platform.objectstore import ObjectInfo, ObjectStore
from iot_platform.rawbatch import BatchKey, read_batch

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key that serialises load transactions (see load_frames).
LOAD_LOCK_KEY = 0x10A7_0AD

# PostgreSQL type of each decoder column type (the staging tables' columns).
_PG_TYPES: dict[pl.DataType, str] = {
    UTC_US: "timestamptz",
    pl.String(): "text",
    pl.Float64(): "float8",
    pl.Int64(): "bigint",
}


def _stage_columns(schema: pl.Schema, *stored: str) -> dict[str, str]:
    """The columns a table stores, typed from the decoder's schema (the one definition of
    each frame's columns); ``stored`` picks and orders them."""
    return {name: _PG_TYPES[schema[name]] for name in stored}


# The decoded columns each warehouse table stores (the rest, e.g. telemetry's received_at
# and seq, serve decoding and de-duplication only).
_STAGE_COLUMNS: dict[str, dict[str, str]] = {
    "telemetry": _stage_columns(TELEMETRY_SCHEMA, "ts", "device_id", "metric", "value", "unit"),
    "device_events": _stage_columns(EVENTS_SCHEMA, *EVENTS_SCHEMA.names()),
    "device_messages": _stage_columns(MESSAGES_SCHEMA, *MESSAGES_SCHEMA.names()),
    "decode_rejects": _stage_columns(REJECTS_SCHEMA, *REJECTS_SCHEMA.names()),
}


def _column_list(table: str) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, _STAGE_COLUMNS[table]))


@dataclass
class BatchLoad:
    """What loading one batch did (for asset metadata)."""

    key: str
    batch_id: int
    raw_rows: int
    telemetry_rows: int
    event_rows: int
    reject_rows: int
    duplicate_rows: int
    min_ts: dt.datetime | None
    max_ts: dt.datetime | None
    refresh_from: dt.datetime | None
    refresh_to: dt.datetime | None
    reloaded: bool
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


def load_parameters(conn: psycopg.Connection) -> pl.DataFrame:
    rows = conn.execute(
        "SELECT device_id, mode, connector, component, encoding, metric, unit, scale"
        " FROM device_parameters"
    ).fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "device_id": pl.String,
            "mode": pl.String,
            "connector": pl.String,
            "component": pl.String,
            "encoding": pl.String,
            "metric": pl.String,
            "unit": pl.String,
            "scale": pl.Float64,
        },
        orient="row",
    )


def known_devices(conn: psycopg.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT device_id FROM devices")}


def ledger_etags(conn: psycopg.Connection, keys: list[str]) -> dict[str, str | None]:
    """object key -> etag of its last load, for the keys the ledger holds (a committed
    ledger row is a committed load: the row is written in the load's transaction)."""
    if not keys:
        return {}
    return dict(
        conn.execute(
            "SELECT object_key, etag FROM ingest_batches WHERE object_key = ANY(%s)", [keys]
        ).fetchall()
    )


def not_yet_loaded(conn: psycopg.Connection, infos: list[ObjectInfo]) -> list[ObjectInfo]:
    """The objects the ledger holds no load of in their current version (same key and
    etag): what the live path still has to load. A backfill reloads everything instead."""
    done = ledger_etags(conn, [info.key for info in infos])
    return [info for info in infos if info.key not in done or done[info.key] != info.etag]


@dataclass(frozen=True)
class DecodedBatch:
    info: ObjectInfo
    frames: DecodedFrames
    raw_rows: int
    decode_s: float  # read + decode time, for the benchmark's breakdown
    activity: pl.DataFrame  # device_id, last_seen (see device_activity)


def load_objects(
    conn: psycopg.Connection,
    store: ObjectStore,
    infos: list[ObjectInfo],
    *,
    run_id: str | None,
    parameters: pl.DataFrame,
    devices: set[str],
    max_payload_bytes: int,
    ts_window: TsWindow = DEFAULT_TS_WINDOW,
) -> Iterator[tuple[DecodedBatch, BatchLoad, float]]:
    """Read, decode and load raw batches in order, one transaction each; yields each
    batch's decoded frames, load result and load seconds.

    The next batch is read and decoded in a worker thread while this one is written:
    Polars and the PostgreSQL socket both work outside the GIL, so on two cores decoding
    hides behind the load instead of adding to it. ``ts_window`` bounds device time
    (decoder) and how long a telemetry (device_id, seq) stays claimed (loader).
    """

    def decode(info: ObjectInfo) -> DecodedBatch:
        started = time.perf_counter()
        table = read_batch(store.get(info.key)).table
        frames = decode_raw(
            table,
            parameters,
            max_payload_bytes=max_payload_bytes,
            known_devices=devices,
            ts_window=ts_window,
        )
        activity = device_activity(table, frames)
        return DecodedBatch(info, frames, table.num_rows, time.perf_counter() - started, activity)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        upcoming = [pool.submit(decode, info) for info in infos[:1]]
        for n in range(len(infos)):
            decoded = upcoming.pop().result()
            if n + 1 < len(infos):
                upcoming.append(pool.submit(decode, infos[n + 1]))
            started = time.perf_counter()
            load = load_frames(
                conn,
                decoded.info,
                decoded.frames,
                raw_rows=decoded.raw_rows,
                run_id=run_id,
                activity=decoded.activity,
                claim_window=ts_window.age,
            )
            yield decoded, load, time.perf_counter() - started


def load_object(
    conn: psycopg.Connection,
    store: ObjectStore,
    info: ObjectInfo,
    *,
    run_id: str | None,
    parameters: pl.DataFrame,
    devices: set[str],
    max_payload_bytes: int,
) -> BatchLoad:
    """Read, decode and load one raw batch object."""
    ((_decoded, load, _seconds),) = load_objects(
        conn,
        store,
        [info],
        run_id=run_id,
        parameters=parameters,
        devices=devices,
        max_payload_bytes=max_payload_bytes,
    )
    return load


def load_frames(
    conn: psycopg.Connection,
    info: ObjectInfo,
    frames: DecodedFrames,
    *,
    raw_rows: int,
    run_id: str | None,
    claim_window: dt.timedelta = DEFAULT_TS_WINDOW.age,
    activity: pl.DataFrame,
) -> BatchLoad:
    partition_key = BatchKey.parse(info.key).partition_key
    # The rollups are over telemetry only: its ts range is the refresh window (an old
    # status, e.g. a last will with the connect time, must not widen it).
    times = frames.telemetry.get_column("ts")
    # ts is a Datetime column (TELEMETRY_SCHEMA): its min and max are datetimes.
    min_ts, max_ts = (
        (cast(dt.datetime, times.min()), cast(dt.datetime, times.max()))
        if len(times)
        else (None, None)
    )
    # The receive-time range of the stored messages: the minutes of device_messages_1m
    # that this batch changes (warehouse/message_minutes.py).
    received = frames.messages.get_column("received_at")
    received_from, received_to = (
        (cast(dt.datetime, received.min()), cast(dt.datetime, received.max()))
        if len(received)
        else (None, None)
    )
    with conn.transaction():
        # A crash may lose this commit, and then its ledger row too: the batch is simply
        # loaded again. Not waiting for the WAL flush makes each batch's commit cheap.
        conn.execute("SET LOCAL synchronous_commit = off")
        # One load transaction at a time (two runs of different hours, a backfill beside
        # the live path). De-duplication needs "claimed by an earlier batch" (lower
        # batch_id, _drop_claimed) to mean "its rows are the stored ones". Two overlapping
        # loads of the same messages broke that: each saw no claim, the later id's rows
        # won the unique index, and reloading that batch then dropped them as claimed by
        # the other — a message lost (tests/integration/test_warehouse.py reproduces it).
        # Holding this lock from before the ledger insert to the commit makes batch_id
        # order the commit order. (Inside a caller's open transaction this block is a
        # savepoint and the lock lasts until that commits: the asset commits its reads
        # first, so each batch is a transaction of its own.)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOAD_LOCK_KEY])
        previous = conn.execute(
            """SELECT batch_id, min_ts, max_ts, received_from, received_to FROM ingest_batches
               WHERE object_key = %s FOR UPDATE""",
            [info.key],
        ).fetchone()
        if previous:
            batch_id, old_min, old_max, old_received_from, old_received_to = previous
            _delete_batch(conn, batch_id, old_min, old_max)
        else:
            inserted = conn.execute(
                """INSERT INTO ingest_batches (object_key, partition_key, raw_rows, telemetry_rows,
                       event_rows, reject_rows, duplicate_rows)
                   VALUES (%s, %s, 0, 0, 0, 0, 0) RETURNING batch_id""",
                [info.key, partition_key],
            ).fetchone()
            assert inserted is not None  # INSERT ... RETURNING of one row returns one row
            batch_id = inserted[0]
            old_min = old_max = old_received_from = old_received_to = None
        telemetry, repeated = _drop_claimed(
            conn, frames.telemetry, frames.messages, batch_id, claim_window
        )
        _insert_messages(conn, frames.messages, batch_id)
        duplicates = frames.duplicates + repeated
        telemetry_rows = _insert_telemetry(conn, telemetry, batch_id)
        event_rows = _insert_events(conn, frames.events, batch_id)
        _insert_rejects(conn, frames.rejects, batch_id, info.key)
        _touch_devices(conn, activity)
        refresh_from = _earliest(min_ts, old_min)
        refresh_to = _latest(max_ts, old_max)
        conn.execute(
            """UPDATE ingest_batches SET etag = %s, size_bytes = %s, raw_rows = %s,
                   telemetry_rows = %s, event_rows = %s, reject_rows = %s, duplicate_rows = %s,
                   min_ts = %s, max_ts = %s, refresh_from = %s, refresh_to = %s,
                   received_from = %s, received_to = %s,
                   loaded_at = clock_timestamp(), dagster_run_id = %s,
                   load_count = load_count + %s, rollups_refreshed_at = NULL
               WHERE batch_id = %s""",
            [
                info.etag,
                info.size,
                raw_rows,
                telemetry_rows,
                event_rows,
                frames.rejects.height,
                duplicates,
                min_ts,
                max_ts,
                refresh_from,
                refresh_to,
                # old and new rows: a reload removed the old ones from their minutes
                _earliest(received_from, old_received_from),
                _latest(received_to, old_received_to),
                run_id,
                1 if previous else 0,
                batch_id,
            ],
        )
    reasons = frames.rejects.get_column("reason").value_counts()
    return BatchLoad(
        key=info.key,
        batch_id=batch_id,
        raw_rows=raw_rows,
        telemetry_rows=telemetry_rows,
        event_rows=event_rows,
        reject_rows=frames.rejects.height,
        duplicate_rows=duplicates,
        min_ts=min_ts,
        max_ts=max_ts,
        refresh_from=refresh_from,
        refresh_to=refresh_to,
        reloaded=previous is not None,
        rejects_by_reason=dict(
            zip(reasons["reason"].to_list(), reasons["count"].to_list(), strict=True)
        ),
    )


def _drop_claimed(
    conn: psycopg.Connection,
    telemetry: pl.DataFrame,
    messages: pl.DataFrame,
    batch_id: int,
    window: dt.timedelta,
) -> tuple[pl.DataFrame, int]:
    """The telemetry rows whose envelope (device_id, seq) no earlier-stored batch has
    claimed, and how many rows were dropped as duplicates.

    The decoder keeps the first envelope per (device_id, seq) within a batch; this keeps
    the first *stored* one across batches, so the outcome does not depend on where the
    daemon cut its batches. A claim is a ``device_messages`` row of a batch stored before
    this one (lower batch_id: a reload keeps its claims) received within ``window`` of
    this message: after that a seq may come round again (it wraps at 2^32-1).

    The lookup first sends the batch's seqs as runs of consecutive numbers per device (one
    run per device in a batch of ordinary traffic, as seq is monotonic) and asks which
    runs hold any stored seq at all: one probe of the (device_id, seq) index per run,
    finding nothing normally. Only the seqs of runs that do are then checked one by one
    against the rule (earlier batch, within the window), each probe stopping at its first
    claim, so a device that repeats one seq endlessly costs one probe per batch, not a
    read of every stored copy. The server reads none of this batch's own rows (the earlier
    lookup read them back through the batch_id index and probed every seq: 8 % of
    PostgreSQL's busy time at 50,000 rows/s). When the shared subscription spreads one
    device's messages over several ingest daemons, a batch holds every Nth seq and each
    seq is a run of its own: one probe per message again, as before, plus the arrays
    sent as parameters (not measured; the benchmarks run one daemon).

    Both lookups are lateral loops with ``LIMIT``, which the planner cannot turn into
    joins (an EXISTS drops its LIMIT and may become one): as a join, a table whose
    statistics lag its size (a fresh warehouse under load) got a sequential scan. The
    first lookup names no column outside the index: with the window in that range query
    the planner added the BRIN indexes on received_at and batch_id, whose ranges match
    the whole table, and every run read every stored message (7.5 billion rows in one
    10-minute run at 50,000 rows/s). ``messages`` are the batch's decoded envelopes.
    """
    if telemetry.height == 0:
        return telemetry, 0
    envelopes = (
        messages.filter(pl.col("msg_type") == "telemetry")
        .group_by("device_id", "seq")
        .agg(pl.col("received_at").min().alias("at"))
        .sort("device_id", "seq")
    )
    if envelopes.height == 0:
        return telemetry, 0
    starts_run = (pl.col("seq").diff() != 1) | (pl.col("device_id") != pl.col("device_id").shift())
    envelopes = envelopes.with_columns(run=starts_run.fill_null(True).cum_sum())
    runs = envelopes.group_by("run").agg(
        pl.col("device_id").first(),
        pl.col("seq").min().alias("low"),
        pl.col("seq").max().alias("high"),
    )
    # 1. Which runs hold a seq the device has stored before: one index probe per run.
    touched = conn.execute(
        """SELECT r.run FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bigint[])
               AS r(run, device_id, low, high)
           CROSS JOIN LATERAL (
               SELECT 1 FROM device_messages m
               WHERE m.device_id = r.device_id AND m.seq BETWEEN r.low AND r.high
                 AND m.msg_type = 'telemetry'
               LIMIT 1) AS stored""",
        [runs.get_column(c).to_list() for c in ("run", "device_id", "low", "high")],
    ).fetchall()
    if not touched:
        return telemetry, 0
    # 2. Only for those runs' seqs, the exact rule: a row of an earlier batch, in the window.
    candidates = envelopes.filter(pl.col("run").is_in([row[0] for row in touched]))
    claimed = conn.execute(
        """SELECT s.device_id, s.seq
           FROM unnest(%(device)s::text[], %(seq)s::bigint[], %(at)s::timestamptz[])
               AS s(device_id, seq, at)
           CROSS JOIN LATERAL (
               SELECT 1 FROM device_messages m
               WHERE m.device_id = s.device_id AND m.seq = s.seq AND m.msg_type = 'telemetry'
                 AND m.batch_id < %(batch)s
                 AND m.received_at BETWEEN s.at - %(window)s AND s.at + %(window)s
               LIMIT 1) AS hit""",
        {
            "device": candidates.get_column("device_id").to_list(),
            "seq": candidates.get_column("seq").to_list(),
            "at": candidates.get_column("at").to_list(),
            "batch": batch_id,
            "window": window,
        },
    ).fetchall()
    if not claimed:
        return telemetry, 0
    keys = pl.DataFrame(claimed, schema={"device_id": pl.String, "seq": pl.Int64}, orient="row")
    kept = telemetry.join(keys, on=["device_id", "seq"], how="anti", maintain_order="left")
    return kept, telemetry.height - kept.height


def _earliest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    return min(x for x in (a, b) if x is not None) if (a or b) else None


def _latest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    return max(x for x in (a, b) if x is not None) if (a or b) else None


def _delete_batch(
    conn: psycopg.Connection,
    batch_id: int,
    min_ts: dt.datetime | None,
    max_ts: dt.datetime | None,
) -> None:
    if min_ts is not None:
        # The ts bounds let TimescaleDB exclude chunks and use the ts index.
        conn.execute(
            "DELETE FROM telemetry WHERE batch_id = %s AND ts BETWEEN %s AND %s",
            [batch_id, min_ts, max_ts],
        )
    for table in ("device_events", "device_messages", "decode_rejects"):
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(sql.Identifier(table)), [batch_id]
        )


def _stage(conn: psycopg.Connection, name: str, frame: pl.DataFrame) -> str:
    """Create a temp table ``stage_<name>`` holding ``frame``; return its name."""
    columns = _STAGE_COLUMNS[name]
    stage = f"stage_{name}"
    conn.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(stage),
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns.items()
            ),
        )
    )
    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(stage)))
    frame = frame.select(list(columns))
    if frame.height == 0:
        return stage
    if not _copy_into(conn, stage, frame):
        _insert_unnest(conn, stage, frame, columns)
    return stage


# Servers (host, port) that refused COPY FROM STDIN once: not asked again.
_COPY_UNSUPPORTED: set[tuple[str, int]] = set()


def _copy_into(conn: psycopg.Connection, table: str, frame: pl.DataFrame) -> bool:
    """COPY ``frame`` into ``table`` inside a savepoint; False if the server has no COPY
    FROM STDIN (the TimescaleDB test double). Constraint errors propagate, rolled back."""
    server = (conn.info.host, conn.info.port)
    if server in _COPY_UNSUPPORTED:
        return False
    try:
        with conn.transaction():
            copy_binary(conn, table, frame)
    except errors.FeatureNotSupported:
        _COPY_UNSUPPORTED.add(server)
        log.info("server rejects COPY FROM STDIN; loading with unnest instead")
        return False
    return True


def copy_binary(conn: psycopg.Connection, table: str, frame: pl.DataFrame) -> None:
    """COPY in PostgreSQL's binary format, encoded from Arrow by pgpq: the server parses no
    text (timestamps, doubles), the client formats none. Per million telemetry rows into
    telemetry's table and indexes: server 5.1-5.6 CPU-s against 6.3-7.5 for Polars-written
    CSV, client 0.49 s against 0.85 (bench notes in the README). The frame's dtypes must
    be the columns' types exactly (UTC_US, String, Float64, Int64: ``_PG_TYPES``)."""
    text_columns = [c for c, t in frame.schema.items() if t == pl.String]
    # NUL cannot live in a PostgreSQL text value; the decoder already replaced it in text
    # it produces, this guards the COPY itself.
    frame = frame.with_columns(pl.col(text_columns).str.replace_all("\x00", "\ufffd", literal=True))
    arrow = frame.to_arrow(compat_level=pl.CompatLevel.oldest())  # large_string, not views
    encoder = ArrowToPostgresBinaryEncoder(arrow.schema)
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, frame.columns))
        )
    ) as copy:
        copy.write(encoder.write_header())
        for batch in arrow.to_batches():
            copy.write(encoder.write_batch(batch))
        copy.write(encoder.finish())


def _insert_unnest(
    conn: psycopg.Connection, table: str, frame: pl.DataFrame, columns: dict[str, str]
) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({})").format(
            sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in columns.values()),
        ),
        [frame.get_column(c).to_list() for c in columns],
    )


def _insert_telemetry(conn: psycopg.Connection, frame: pl.DataFrame, batch_id: int) -> int:
    if frame.height == 0:
        return 0
    # Sorted like the unique index: B-tree inserts then touch neighbouring pages.
    frame = frame.sort("device_id", "metric", "ts")
    # Fast path: COPY straight into telemetry. Rows already stored (a message redelivered
    # in another batch) make it fail as a whole; the savepoint rolls it back and the
    # staged insert below skips exactly those rows.
    try:
        columns = frame.select(*_STAGE_COLUMNS["telemetry"], batch_id=pl.lit(batch_id, pl.Int64))
        if _copy_into(conn, "telemetry", columns):
            return frame.height
    except errors.UniqueViolation:
        log.debug("batch %s repeats stored telemetry; inserting with conflict handling", batch_id)
    stage = _stage(conn, "telemetry", frame)
    cursor = conn.execute(
        sql.SQL(
            """INSERT INTO telemetry ({columns}, batch_id) SELECT {columns}, %s FROM {stage}
               ON CONFLICT (device_id, metric, ts) DO NOTHING"""
        ).format(columns=_column_list("telemetry"), stage=sql.Identifier(stage)),
        [batch_id],
    )
    return cursor.rowcount


def _insert_events(conn: psycopg.Connection, frame: pl.DataFrame, batch_id: int) -> int:
    if frame.height == 0:
        return 0
    stage = _stage(conn, "device_events", frame)
    # An event delivered twice (in two batches) is stored once.
    cursor = conn.execute(
        sql.SQL(
            """INSERT INTO device_events (ts, device_id, msg_type, seq, body, received_at, batch_id)
               SELECT s.ts, s.device_id, s.msg_type, s.seq, s.body::jsonb, s.received_at, %s
               FROM {} s
               WHERE NOT EXISTS (
                   SELECT 1 FROM device_events e
                   WHERE e.device_id = s.device_id AND e.ts = s.ts AND e.msg_type = s.msg_type
                     AND e.seq IS NOT DISTINCT FROM s.seq AND e.body = s.body::jsonb)"""
        ).format(sql.Identifier(stage)),
        [batch_id],
    )
    return cursor.rowcount


def _insert_messages(conn: psycopg.Connection, frame: pl.DataFrame, batch_id: int) -> None:
    """COPY straight into ``device_messages``: it has no unique key, so nothing to stage."""
    if frame.height == 0:
        return
    columns = {**_STAGE_COLUMNS["device_messages"], "batch_id": "bigint"}
    rows = frame.select(*_STAGE_COLUMNS["device_messages"], batch_id=pl.lit(batch_id, pl.Int64))
    if not _copy_into(conn, "device_messages", rows):
        _insert_unnest(conn, "device_messages", rows, columns)


def _insert_rejects(conn: psycopg.Connection, frame: pl.DataFrame, batch_id: int, key: str) -> None:
    if frame.height == 0:
        return
    stage = _stage(conn, "decode_rejects", frame)
    conn.execute(
        sql.SQL(
            """INSERT INTO decode_rejects (batch_key, batch_id, {columns})
               SELECT %s, %s, {columns} FROM {stage}"""
        ).format(columns=_column_list("decode_rejects"), stage=sql.Identifier(stage)),
        [key, batch_id],
    )


def device_activity(raw: pa.Table, frames: DecodedFrames) -> pl.DataFrame:
    """Per device, the newest receive time of an accepted message that is live traffic.

    A retained message that the broker replays to a new subscription (every ingest
    restart re-subscribes) arrives with the raw ``retain`` flag set: it is an old message,
    not the device being alive (DESIGN §11). Such rows are matched back to the decoded
    rows by receive time and the topic's device level (the second level in every topic
    family, DESIGN §4); a device with a live message at the same instant still counts.
    """
    accepted = pl.concat(
        [
            frames.telemetry.select("device_id", "received_at"),
            frames.events.select("device_id", "received_at"),
        ]
    )
    if pc.any(raw.column("retain")).as_py():
        # from_arrow of a Table is a DataFrame (a Series comes only from an Array).
        live = (
            cast(pl.DataFrame, pl.from_arrow(raw.select(["received_at", "topic", "retain"])))
            .filter(~pl.col("retain"))
            .select(
                pl.col("topic")
                .cast(pl.String)
                .str.split("/")
                .list.get(1, null_on_oob=True)
                .str.to_lowercase()
                .alias("device_key"),
                pl.col("received_at").cast(accepted.schema["received_at"]),
            )
            .unique()
        )
        accepted = accepted.join(
            live,
            left_on=[pl.col("device_id").str.to_lowercase(), "received_at"],
            right_on=["device_key", "received_at"],
            how="semi",
        )
    return accepted.group_by("device_id").agg(pl.col("received_at").max().alias("last_seen"))


def _touch_devices(conn: psycopg.Connection, activity: pl.DataFrame) -> None:
    if activity.height == 0:
        return
    conn.execute(
        """UPDATE devices d SET last_seen = GREATEST(d.last_seen, s.last_seen)
           FROM unnest(%s::text[], %s::timestamptz[]) AS s(device_id, last_seen)
           WHERE d.device_id = s.device_id""",
        [activity.get_column("device_id").to_list(), activity.get_column("last_seen").to_list()],
    )
