"""Latency benchmark: publish -> queryable in ``telemetry`` on the embedded stack.

Starts ``iot-platform up`` exactly as the README does (default settings; a temporary
IOT_HOME and free ports so it does not disturb a running stack), registers and certifies
a few devices, lets them publish v2 telemetry for a few minutes, and polls ``telemetry``
to see when each measurement becomes queryable. Progress goes to stderr; the last stdout
line is JSON: p50_s, p95_s, max_s, published, loaded.

    .venv/bin/python bench/latency.py [--devices 5] [--duration 180] [--interval 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from iot_platform.pki import CertificateAuthority
from iot_platform.services.process import free_port
from iot_platform.simulator import Fleet, SimDevice

READY = "IoT platform is up"


def progress(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def start_stack(home: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOT_", "INGEST_"))}
    env.update(
        IOT_HOME=str(home / "state"),
        IOT_CERTS_DIR=str(home / "certs"),
        IOT_PG_PORT=str(free_port()),
        IOT_BROKER_PORT=str(free_port()),
        IOT_DAGSTER_PORT=str(free_port()),
        INGEST_METRICS_PORT=str(free_port()),
        IOT_SIMULATOR_DEVICES="0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "iot_platform.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if READY in line:
            return proc, env
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("iot-platform up did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of publishing")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="iot-bench-latency-"))
    home.chmod(0o755)
    proc = None
    try:
        progress("starting the embedded stack")
        proc, env = start_stack(home)
        state = Path(env["IOT_HOME"])
        ca = CertificateAuthority(
            Path(env["IOT_CERTS_DIR"]), (state / "secrets" / "ca_passphrase").read_text().strip()
        )
        conninfo = psycopg.conninfo.make_conninfo(
            host="127.0.0.1",
            port=int(env["IOT_PG_PORT"]),
            user="iot",
            dbname="iot",
            password=(state / "secrets" / "pg_password").read_text().strip(),
        )
        devices = [
            SimDevice(
                f"lat-{n:03d}", "meter-dc", send_interval_s=args.interval, hello_interval_s=3600
            )
            for n in range(args.devices)
        ]
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO devices (device_id) SELECT unnest(%s::text[])",
                [[d.device_id for d in devices]],
            )
        for device in devices:
            ca.issue_device_certificate(device.device_id)
        fleet = Fleet(
            devices,
            host="127.0.0.1",
            port=int(env["IOT_BROKER_PORT"]),
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
        }
        print(json.dumps(result))
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
