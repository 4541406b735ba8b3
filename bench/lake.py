"""Raw lake benchmark: a day of micro-batches vs the same day compacted.

Generates one day of traffic as the ingest daemon writes it at its default batch age
(``INGEST_MAX_AGE_S``, one micro-batch per age per daemon while messages arrive) into a
local object store, compacts the 24 hours with the asset's function
(``iot_platform.lake.compact_hour``, verification included), then times an analyst's
DuckDB queries on both layouts, as ``docs/analysts.md`` writes them:

* one device over the day (micro-batches: ``split_part(topic, '/', 2)``; compacted: the
  ``device_id`` column, whose row-group statistics prune; and compacted with the same
  ``split_part`` predicate, to show what the file count alone is worth);
* an aggregate over all devices (messages and payload bytes per device).

Each query runs ``--repeat`` times after one warm-up (page cache warm for both layouts);
the median counts. Progress goes to stderr; the last stdout line is JSON.

    .venv/bin/python bench/lake.py [--devices 200] [--interval-s 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from ingest_daemon.config import DEFAULT_MAX_AGE_S
from iot_platform.lake import LAKE_ROOT, compact_hour, list_batches
from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.rawbatch import KEY_ROOT, encode_batch

DAY = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
METRICS = ["voltage_dc", "current_dc", "power_dc", "energy", "temperature"]


def progress(message: str) -> None:
    print(f"[lake] {message}", file=sys.stderr, flush=True)


def generate(store: LocalDirectoryStore, devices: int, interval_s: float, age_s: float) -> int:
    """A day of v2 telemetry (every ``interval_s`` per device, 5 measurements) plus a hello
    every third message, cut into micro-batches of ``age_s`` of receive time."""
    rng = random.Random(7)  # noqa: S311 - synthetic readings
    period_us = int(interval_s * 1_000_000)
    day_us = int(DAY.timestamp() * 1_000_000)
    messages: list[tuple[int, str, bytes]] = []
    for d in range(devices):
        device = f"dev-{d:05d}"
        for seq, at in enumerate(range(rng.randrange(period_us), 86_400_000_000, period_us), 1):
            ts = dt.datetime.fromtimestamp((day_us + at) / 1e6, dt.UTC).isoformat()
            body = {
                "v": 2,
                "device_id": device,
                "ts": ts,
                "seq": seq,
                "msg_type": "telemetry",
                "measurements": [
                    {"ts": ts, "type": m, "val": round(rng.uniform(0, 900), 2), "unit": "V"}
                    for m in METRICS
                ],
            }
            messages.append((day_us + at, f"iot/{device}/telemetry", json.dumps(body).encode()))
            if seq % 3 == 0:
                hello = {"v": 2, "device_id": device, "ts": ts, "seq": seq, "msg_type": "hello"}
                messages.append(
                    (day_us + at + 1, f"iot/{device}/hello", json.dumps(hello).encode())
                )
    messages.sort()
    progress(f"{len(messages)} messages generated; writing micro-batches")
    step_us = int(age_s * 1_000_000)
    batch_seq = 0
    i = 0
    while i < len(messages):
        # the daemon's batch: from its first message until the age has passed
        end = messages[i][0] + step_us
        j = i
        while j < len(messages) and messages[j][0] < end:
            j += 1
        chunk = messages[i:j]
        batch = encode_batch(
            received_at_us=[m[0] for m in chunk],
            topics=[m[1] for m in chunk],
            payloads=[m[2] for m in chunk],
            qos=[1] * len(chunk),
            retain=[False] * len(chunk),
            instance="bench",
            seq=batch_seq,
        )
        store.put(batch.key.key, batch.data)
        batch_seq += 1
        i = j
        if batch_seq % 10_000 == 0:
            progress(f"{batch_seq} micro-batches")
    return len(messages)


def timed(
    con: duckdb.DuckDBPyConnection, sql: str, params: list, repeat: int
) -> tuple[float, list]:
    result = con.execute(sql, params).fetchall()  # warm-up
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        again = con.execute(sql, params).fetchall()
        seconds.append(time.perf_counter() - started)
        assert again == result
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file-max-rows", type=int, default=2_000_000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="iot-bench-lake-"))
    try:
        store = LocalDirectoryStore(root)
        store.ensure_ready()
        started = time.perf_counter()
        rows = generate(store, args.devices, args.interval_s, DEFAULT_MAX_AGE_S)
        batches = sum(len(list_batches(store, DAY + dt.timedelta(hours=h))) for h in range(24))
        progress(
            f"generated {batches} micro-batches, {rows} messages in "
            f"{time.perf_counter() - started:.0f} s"
        )

        compact_s = 0.0
        now = DAY + dt.timedelta(days=2)
        for h in range(24):
            result = compact_hour(
                store,
                DAY + dt.timedelta(hours=h),
                now,
                lateness=dt.timedelta(minutes=30),
                max_rows=args.file_max_rows,
            )
            assert result.status == "compacted" and result.manifest is not None
            compact_s += result.seconds
        lake_files = list(store.list(LAKE_ROOT))
        progress(f"compacted {rows} rows into {len(lake_files)} files in {compact_s:.1f} s")

        con = duckdb.connect()
        raw = f"read_parquet('{root}/{KEY_ROOT}*/*/*.parquet', hive_partitioning = true)"
        lake = f"read_parquet('{root}/{LAKE_ROOT}*/*/*.parquet', hive_partitioning = true)"
        device = f"dev-{args.devices // 2:05d}"
        one = (
            "SELECT count(*), sum(octet_length(payload)), min(received_at), max(received_at) FROM "
        )
        all_ = (
            "SELECT {d} AS device, count(*), sum(octet_length(payload)) FROM {src} "
            "GROUP BY ALL ORDER BY ALL"
        )
        figures = {}
        queries = {
            "one_device_raw": (one + raw + " WHERE split_part(topic, '/', 2) = ?", [device]),
            "one_device_lake": (one + lake + " WHERE device_id = ?", [device]),
            "one_device_lake_split_part": (
                one + lake + " WHERE split_part(topic, '/', 2) = ?",
                [device],
            ),
            "all_devices_raw": (all_.format(d="split_part(topic, '/', 2)", src=raw), []),
            "all_devices_lake": (all_.format(d="device_id", src=lake), []),
        }
        results = {}
        for name, (sql, params) in queries.items():
            figures[name + "_s"], results[name] = timed(con, sql, params, args.repeat)
            progress(f"{name}: {figures[name + '_s']:.3f} s")
        assert results["one_device_raw"] == results["one_device_lake"]
        assert results["one_device_raw"] == results["one_device_lake_split_part"]
        assert results["all_devices_raw"] == results["all_devices_lake"]
        print(
            json.dumps(
                {
                    "devices": args.devices,
                    "interval_s": args.interval_s,
                    "batch_age_s": DEFAULT_MAX_AGE_S,
                    "messages": rows,
                    "micro_batches": batches,
                    "raw_bytes": sum(i.size for i in store.list(KEY_ROOT)),
                    "lake_files": len(lake_files),
                    "lake_bytes": sum(i.size for i in lake_files),
                    "compaction_s": round(compact_s, 2),
                    "compaction_rows_per_s": round(rows / compact_s),
                    "compaction_batches_per_s": round(batches / compact_s),
                    **{k: round(v, 4) for k, v in figures.items()},
                    "speedup_one_device": round(
                        figures["one_device_raw_s"] / figures["one_device_lake_s"], 1
                    ),
                    "speedup_all_devices": round(
                        figures["all_devices_raw_s"] / figures["all_devices_lake_s"], 1
                    ),
                    "duckdb": duckdb.__version__,
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
