"""Pipeline benchmark: raw batches -> decode (Polars) -> load (PostgreSQL) -> rollups.

Generates raw batches holding 1,000,000 measurements from 2,000 v2-envelope devices in a
local object store, then runs the same functions the assets use on a real PostgreSQL
started for the run (``load_objects``: each batch decoded in a thread while the previous
one loads, so ``rows_per_s`` is rows over the wall time of both; ``decode_s`` and
``load_s`` are each one's own busy time). The ceiling is a plain COPY of the
already-decoded rows into the same table in the same run. Progress goes to stderr; the
last stdout line is JSON.

    .venv/bin/python bench/pipeline.py [--devices 2000] [--envelopes 100] [--measurements 5]
        [--bindir /path/to/postgresql/bin] [--dialect auto|timescaledb|postgresql]

``--bindir`` picks the server binaries (default: the system's); with TimescaleDB installed
for them, ``auto`` loads into a hypertable and refreshes continuous aggregates, so the same
command measures both dialects.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import polars as pl
import psycopg

from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.rawbatch import encode_batch
from iot_platform.settings import WAREHOUSE_DIALECTS
from iot_platform.warehouse.aggregates import ROLLUPS, refresh
from iot_platform.warehouse.load import copy_binary, known_devices, load_objects, load_parameters
from iot_platform.warehouse.migrations import Dialect, migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import scratch_warehouse

METRICS = ["voltage_dc", "current_dc", "power_dc", "energy", "temperature", "frequency"]
BATCH_ENVELOPES = 20_000


def progress(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def generate(store, devices: int, envelopes: int, measurements: int) -> list[str]:
    rng = random.Random(42)  # noqa: S311 - synthetic readings
    start = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
    rows = []
    for n in range(envelopes):
        ts = start + dt.timedelta(seconds=10 * n)
        for d in range(devices):
            device_id = f"bench-{d:05d}"
            body = {
                "v": 2,
                "device_id": device_id,
                "ts": ts.isoformat(),
                "seq": n,
                "msg_type": "telemetry",
                "measurements": [
                    {"type": METRICS[m], "val": round(rng.uniform(0, 1000), 3), "unit": "u"}
                    for m in range(measurements)
                ],
            }
            rows.append(
                (
                    ts + dt.timedelta(milliseconds=200),
                    f"iot/{device_id}/telemetry",
                    json.dumps(body).encode(),
                )
            )
    keys = []
    for seq, at in enumerate(range(0, len(rows), BATCH_ENVELOPES)):
        chunk = rows[at : at + BATCH_ENVELOPES]
        encoded = encode_batch(
            received_at_us=[int(r.timestamp() * 1e6) for r, _, _ in chunk],
            topics=[t for _, t, _ in chunk],
            payloads=[p for _, _, p in chunk],
            qos=[1] * len(chunk),
            retain=[False] * len(chunk),
            instance="bench",
            seq=seq,
        )
        store.put(encoded.key.key, encoded.data)
        keys.append(encoded.key.key)
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--envelopes", type=int, default=100, help="per device")
    parser.add_argument("--measurements", type=int, default=5, help="per envelope")
    parser.add_argument("--bindir", type=Path, default=None, help="PostgreSQL server binaries")
    parser.add_argument("--dialect", choices=WAREHOUSE_DIALECTS, default="auto")
    args = parser.parse_args()

    scratch = scratch_warehouse("pipeline", bindir=args.bindir, dialect=args.dialect)
    with scratch as (work, conninfo):
        store = LocalDirectoryStore(work / "objects")
        progress("generating raw batches")
        keys = generate(store, args.devices, args.envelopes, args.measurements)
        with psycopg.connect(conninfo) as conn:
            dialect, _ = migrate(conn, args.dialect)
            conn.execute(
                "INSERT INTO devices (device_id) SELECT 'bench-' || lpad(g::text, 5, '0')"
                " FROM generate_series(0, %s) g",
                [args.devices - 1],
            )
            conn.commit()
            params, devices = load_parameters(conn), known_devices(conn)
            conn.commit()  # as the asset does: one transaction per batch
            decode_s = load_s = 0.0
            rows = 0
            decoded = []
            t0 = time.perf_counter()
            for batch, result, seconds in load_objects(
                conn,
                store,
                [store.stat(key) for key in keys],
                run_id="bench",
                parameters=params,
                devices=devices,
                max_payload_bytes=262_144,
            ):
                decode_s += batch.decode_s
                load_s += seconds
                rows += result.telemetry_rows
                decoded.append(batch.frames.telemetry)
                progress(f"{batch.info.key.rsplit('/', 1)[-1]}: {result.telemetry_rows} rows")
            wall_s = time.perf_counter() - t0
            lo, hi = conn.execute("SELECT min(ts), max(ts) FROM telemetry").fetchone()
            conn.commit()
            t0 = time.perf_counter()
            conn.autocommit = True
            for name in ROLLUPS:
                refresh(conn, Dialect(dialect), name, lo, hi)
            refresh_s = time.perf_counter() - t0

            # Ceiling: COPY the already-decoded rows into an identical empty table.
            conn.execute("CREATE TABLE telemetry_ceiling (LIKE telemetry INCLUDING ALL)")
            frame = pl.concat(decoded).select("ts", "device_id", "metric", "value", "unit")
            frame = frame.with_columns(batch_id=pl.lit(1, pl.Int64))
            t0 = time.perf_counter()
            copy_binary(conn, "telemetry_ceiling", frame)  # the loader's own COPY
            ceiling_s = time.perf_counter() - t0
        rows_per_s = rows / wall_s  # decode overlaps load (load_objects), so wall time
        ceiling = frame.height / ceiling_s
        result = {
            "rows": rows,
            "rows_per_s": round(rows_per_s),
            "decode_s": round(decode_s, 2),
            "load_s": round(load_s, 2),
            "decode_load_wall_s": round(wall_s, 2),
            "refresh_s": round(refresh_s, 2),
            "ceiling_rows_per_s": round(ceiling),
            "ratio": round(rows_per_s / ceiling, 3),
            "dialect": str(dialect),
        }
        print(json.dumps(result))
        return 0


if __name__ == "__main__":
    sys.exit(main())
