"""Under load, each outage is recovered automatically with nothing lost or double-counted.

The embedded stack runs against a real S3 server (moto, the MinIO code path) while a
simulated fleet publishes; the test kills the ingest daemon with SIGKILL, freezes the
object store for 20 s, and restarts PostgreSQL while loads run. Then every measurement
the fleet published must be in ``telemetry`` exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.stack import Stack, child_pids, make_stack_env, stack_warehouse
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.long]

FLEET = [sys.executable, "-m", "iot_platform.cli", "simulate", "--prefix", "ft"]
FLEET += ["--devices", "6", "--interval", "0.5", "--duration", "110", "--fault", "0=duplicate"]


def _count(conninfo: str, query: str) -> int:
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            return conn.execute(query).fetchone()[0]
    except psycopg.OperationalError:
        return -1  # the server is restarting


def _per_device(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT device_id, count(*) FROM telemetry"
            " WHERE device_id LIKE 'ft-%' OR device_id LIKE 'f2-%' GROUP BY device_id"
        ).fetchall()
    return dict(rows)


def _unstored_envelopes(conninfo: str, device_id: str) -> list[tuple]:
    """Telemetry envelopes the warehouse received for the device but holds no rows of:
    (seq, ts, [(batch_id, object_key, load_count, duplicate_rows, dagster_run_id)])."""
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            """SELECT m.seq, m.ts, array_agg(ARRAY[b.batch_id::text, b.object_key,
                          b.load_count::text, b.duplicate_rows::text, b.dagster_run_id]
                          ORDER BY b.batch_id)
               FROM device_messages m JOIN ingest_batches b USING (batch_id)
               WHERE m.device_id = %s AND m.msg_type = 'telemetry'
                 AND NOT EXISTS (SELECT 1 FROM telemetry t
                                 WHERE t.device_id = m.device_id AND t.ts = m.ts)
               GROUP BY m.seq, m.ts ORDER BY m.seq""",
            [device_id],
        ).fetchall()


def test_ingest_kill_object_store_freeze_and_postgres_restart_lose_nothing(s3_server_factory):
    s3 = s3_server_factory()
    home = Path(tempfile.mkdtemp(prefix="iot-faults-"))
    env = make_stack_env(
        home,
        IOT_OBJECT_STORE="s3",
        IOT_S3_ENDPOINT=s3.endpoint,
        IOT_S3_BUCKET=s3.bucket,
        IOT_S3_ACCESS_KEY=s3.access_key,
        IOT_S3_SECRET_KEY=s3.secret_key,
        IOT_S3_TIMEOUT_S="3",
    )
    stack = Stack(env)
    stack.start()
    fleet = None
    try:
        warehouse = stack_warehouse(env)
        loaded = (
            "SELECT count(*) FROM telemetry WHERE device_id LIKE 'ft-%' OR device_id LIKE 'f2-%'"
        )
        fleet = subprocess.Popen(
            FLEET, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

        def fleet_state() -> str:
            if fleet.poll() is None:
                return "(the fleet is still running)"
            return f"(the fleet exited {fleet.returncode}: {fleet.stderr.read()[-2000:]})"

        wait_until(
            "fleet data in telemetry",
            lambda: _count(warehouse, loaded) > 0,
            180,
            explain=fleet_state,
        )

        # 1. kill -9 the ingest daemon: the supervisor restarts it, the broker kept the
        #    un-acknowledged messages of its persistent session.
        (ingest,) = child_pids(stack, "-m ingest_daemon")
        os.kill(ingest, signal.SIGKILL)
        wait_until(
            "ingest restarted",
            lambda: child_pids(stack, "-m ingest_daemon") not in ([], [ingest]),
            90,
        )

        # 2. The object store hangs for 20 s: uploads time out and spool, the sensor skips.
        time.sleep(5)
        s3.process.signal(signal.SIGSTOP)
        time.sleep(20)
        s3.process.signal(signal.SIGCONT)

        # 3. PostgreSQL restarts while loads run (fast shutdown aborts them; retried).
        batches = "SELECT count(*) FROM ingest_batches"
        before = _count(warehouse, batches)
        wait_until("a load after the outage", lambda: _count(warehouse, batches) > before, 120)
        # The postmaster's PID from PostgreSQL's own record: matching command lines also
        # finds a backend forked a moment ago that has not yet renamed itself.
        pid_file = Path(env["IOT_HOME"]) / "postgres" / "cluster" / "postmaster.pid"
        postmaster = int(pid_file.read_text().splitlines()[0])
        assert postmaster in child_pids(stack, "bin/postgres -D"), postmaster
        os.kill(postmaster, signal.SIGINT)
        wait_until("postgres restarted", lambda: _count(warehouse, "SELECT 1") == 1, 120)

        out, err = fleet.communicate(timeout=240)
        assert fleet.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        expected = sum(report["good_measurements"].values())
        wait_until(
            "every measurement loaded",
            lambda: _count(warehouse, loaded) >= expected,
            300,
            explain=lambda: (
                f"expected {report['good_measurements']}, loaded {_per_device(warehouse)}"
            ),
        )
        time.sleep(10)  # anything still in flight would now show up as an excess
        per_device = _per_device(warehouse)
        good = report["good_measurements"]
        assert set(per_device) == set(good)
        for device, count in good.items():
            if "-meter-" in device:  # v2 envelopes carry a seq: exactly once
                assert per_device[device] == count, (
                    device,
                    per_device,
                    good,
                    _unstored_envelopes(warehouse, device),
                )
            else:
                # Scalar and parametrised topics have no seq and take the receive time as
                # ts: a batch uploaded but not yet acknowledged when the daemon is killed
                # is redelivered and stored again (at-least-once, see the README). Lost: never.
                assert per_device[device] >= count, (device, per_device, good)
    finally:
        if fleet is not None and fleet.poll() is None:
            fleet.kill()
        code = stack.interrupt()
        shutil.rmtree(home, ignore_errors=True)
    log = "".join(stack.output)
    assert code == 0, log[-4000:]
    for child in ("ingest", "postgres"):
        assert f"{child} exited unexpectedly; restarting it" in log, log[-4000:]
    print(
        json.dumps(
            {
                "messages_published": sum(report["published"].values()),
                "measurements": expected,
                "loaded": sum(per_device.values()),
                "faults": ["ingest SIGKILL", "object store frozen 20 s", "postgres restart"],
                "lost": sum(max(0, n - per_device[d]) for d, n in good.items()),
                "redelivered_no_seq": sum(per_device.values()) - expected,
            }
        )
    )
