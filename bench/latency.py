"""Latency benchmark: publish -> queryable in ``telemetry`` on the embedded stack.

Starts ``iot-platform up`` exactly as the README does (default settings; a temporary
IOT_HOME and free ports so it does not disturb a running stack), registers and certifies
a few devices, lets them publish v2 telemetry for a few minutes, and polls ``telemetry``
to see when each measurement becomes queryable. Progress goes to stderr; the last stdout
line is JSON: p50_s, p95_s, max_s, published, loaded.

    .venv/bin/python bench/latency.py [--devices 5] [--duration 180] [--interval 1]
        [--bindir /path/to/postgresql/bin]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

from iot_platform.simulator import Fleet, SimDevice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded import EmbeddedStack


def progress(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of publishing")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--bindir", type=Path, default=None, help="PostgreSQL server binaries")
    args = parser.parse_args()

    stack = EmbeddedStack("latency", bindir=args.bindir)
    try:
        progress("starting the embedded stack")
        stack.start()
        ca, conninfo = stack.ca, stack.conninfo
        devices = [
            SimDevice(
                f"lat-{n:03d}", "meter-dc", send_interval_s=args.interval, hello_interval_s=3600
            )
            for n in range(args.devices)
        ]
        stack.register_devices([d.device_id for d in devices])
        fleet = Fleet(
            devices,
            host="127.0.0.1",
            port=stack.broker_port,
            ca_file=ca.ca_cert_path,
            credentials=lambda d: ca.device_paths(d.device_id),
        )
        fleet.connect()
        progress(
            f"{args.devices} devices publishing every {args.interval}s for {args.duration:.0f}s"
        )
        seen: dict[tuple[str, dt.datetime], float] = {}
        started = time.time()
        publisher = threading.Thread(target=fleet.run, args=(args.duration,), daemon=True)
        publisher.start()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            deadline = started + args.duration + 120
            expected = None
            while time.time() < deadline:
                now = time.time()
                for device_id, ts in conn.execute(
                    "SELECT DISTINCT device_id, ts FROM telemetry WHERE device_id LIKE 'lat-%%'"
                ):
                    seen.setdefault((device_id, ts), now)
                if not publisher.is_alive():
                    expected = fleet.report.published["telemetry"]
                    if len(seen) >= expected:
                        break
                time.sleep(0.5)
        fleet.close()
        delays = sorted(at - ts.timestamp() for (_, ts), at in seen.items())
        published = fleet.report.published["telemetry"]
        result = {
            "p50_s": round(statistics.median(delays), 2) if delays else None,
            "p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2) if delays else None,
            "max_s": round(delays[-1], 2) if delays else None,
            "published": published,
            "loaded": len(seen),
            "devices": args.devices,
            "duration_s": args.duration,
            "dialect": stack.dialect(),
        }
        print(json.dumps(result))
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
