"""End to end on the embedded stack started as the README starts it, default fleet included.

Devices are enrolled through the enrollment job, publish over mTLS with injected faults,
and the data goes raw batch -> sensor -> load -> rollups -> health checks -> dbt marts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from iot_platform.defs.keys import (
    DEVICE_EVENTS,
    TELEMETRY,
    TELEMETRY_1D,
    TELEMETRY_1H,
    TELEMETRY_1M,
)
from iot_platform.launcher import JobLauncher
from tests.fixtures.stack import Stack, make_stack_env, stack_warehouse
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.long]
LOAD_ASSETS = [TELEMETRY, DEVICE_EVENTS, TELEMETRY_1M, TELEMETRY_1H, TELEMETRY_1D]

# The e2e fleet (prefix e2e): index -> kind by the simulator's rotation.
E2E = {
    "gap": "e2e-meter-dc-000",
    "skew": "e2e-meter-ac-001",
    "clean": "e2e-sensor-002",
    "silence": None,  # the controller's id is derived (f2-...); read from the report
    "duplicate+malformed": "e2e-meter-dc-004",
}
SIMULATE = [sys.executable, "-m", "iot_platform.cli", "simulate", "--prefix", "e2e"]
SIMULATE += ["--devices", "5", "--interval", "1", "--hello-interval", "10", "--duration", "85"]
SIMULATE += ["--fault", "0=gap", "--fault", "1=skew", "--fault", "3=silence"]
SIMULATE += ["--fault", "4=duplicate,malformed"]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Stack, dict[str, str], str]]:
    home = Path(tempfile.mkdtemp(prefix="iot-e2e-"))
    env = make_stack_env(home, IOT_SIMULATOR_DEVICES="4", IOT_SIMULATOR_INTERVAL_S="2")
    stack = Stack(env)
    summary = stack.start()
    try:
        yield stack, env, summary
    finally:
        assert stack.interrupt() == 0, "".join(stack.output)
        shutil.rmtree(home, ignore_errors=True)


def _poll(conn: psycopg.Connection, query: str, done, timeout: float, params=None):
    """Re-run ``query`` until ``done(rows)``; returns those rows."""
    last: list = []

    def check() -> bool:
        last[:] = [conn.execute(query, params).fetchall()]
        conn.commit()
        return done(last[0])

    wait_until(repr(query), check, timeout, explain=lambda: f"last {last[0]!r}")
    return last[0]


def _health(conn: psycopg.Connection, since, device_ids: list[str]) -> dict[str, set[str]]:
    """check name -> devices flagged (non-ok) among ``device_ids`` in evaluations since then."""
    rows = conn.execute(
        "SELECT check_name, device_id FROM device_health"
        " WHERE checked_at >= %s AND status <> 'ok' AND device_id = ANY(%s)",
        [since, device_ids],
    ).fetchall()
    flagged: dict[str, set[str]] = {}
    for check, device in rows:
        flagged.setdefault(check, set()).add(device)
    return flagged


def test_devices_to_marts_with_every_fault_flagged(stack):
    _stack, env, summary = stack
    assert "Simulator    4 devices" in summary
    launcher = JobLauncher(f"http://127.0.0.1:{env['IOT_DAGSTER_PORT']}", timeout_s=300)
    with urllib.request.urlopen(launcher.base_url, timeout=10) as response:
        assert response.status == 200  # the Dagster UI answers

    with psycopg.connect(stack_warehouse(env)) as conn:
        # The default fleet was enrolled through enroll_device and its data flows.
        _poll(
            conn,
            "SELECT count(DISTINCT device_id) FROM telemetry WHERE device_id LIKE 'sim-%%'"
            " OR device_id LIKE 'f2-%%'",
            lambda rows: rows[0][0] >= 4,
            timeout=180,
        )
        assert (
            conn.execute(
                "SELECT count(*) FROM certificate_audit"
                " WHERE action = 'issue' AND actor = 'simulator'"
            ).fetchone()[0]
            >= 4
        )

        fleet = subprocess.Popen(
            SIMULATE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Mid-flight (the silent device, quiet from 20 s on, has been so for > 2 x its
            # 10 s hello interval; the others publish), the health checks flag each fault.
            _poll(
                conn,
                "SELECT count(DISTINCT device_id) FROM telemetry WHERE device_id LIKE 'e2e-%%'",
                lambda rows: rows[0][0] >= 4,
                timeout=120,
            )
            time.sleep(40)
            since = conn.execute("SELECT now()").fetchone()[0]
            conn.commit()
            checks = launcher.run("device_health_job", {})
            assert checks.status.value in {"SUCCESS", "FAILURE"}, checks  # ERROR checks fail
        finally:
            out, err = fleet.communicate(timeout=200)
        assert fleet.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        controller = next(d for d in report["faults"] if d.startswith("f2-"))
        e2e_ids = sorted(report["faults"])
        flagged = _health(conn, since, e2e_ids)
        assert flagged.get("sequence_gaps_duplicates") == {E2E["gap"], E2E["duplicate+malformed"]}
        assert flagged.get("clock_skew") == {E2E["skew"]}
        assert flagged.get("decode_reject_rate") == {E2E["duplicate+malformed"]}
        assert flagged.get("silent_devices") == {controller}
        assert E2E["clean"] not in set().union(*flagged.values())
        # The AC meter reads 25 kV like the protocol's rail meters: inside its type's bounds.
        assert flagged.get("values_out_of_range", set()).isdisjoint(E2E.values())
        reasons = conn.execute(
            "SELECT DISTINCT reason FROM decode_rejects WHERE topic LIKE %s",
            [f"iot/{E2E['duplicate+malformed']}/%"],
        ).fetchall()
        assert reasons == [("malformed_json",)]

        # Every good measurement exactly once (duplicates and redeliveries collapsed).
        expected = report["good_measurements"]
        got = _poll(
            conn,
            "SELECT device_id, count(*) FROM telemetry WHERE device_id = ANY(%s)"
            " GROUP BY device_id ORDER BY device_id",
            lambda rows: dict(rows) == expected,
            timeout=180,
            params=[e2e_ids],
        )
        assert dict(got) == expected

        # A backfill launched as from the UI reloads the hours idempotently: every batch
        # is loaded once more, the counts do not move.
        ledger = dict(
            conn.execute(
                "SELECT object_key, load_count FROM ingest_batches"
                " WHERE batch_id IN (SELECT DISTINCT batch_id FROM telemetry"
                "  WHERE device_id = ANY(%s))",
                [e2e_ids],
            ).fetchall()
        )
        hours = sorted(
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT partition_key FROM ingest_batches WHERE object_key = ANY(%s)",
                [list(ledger)],
            )
        )
        conn.commit()
        status = launcher.backfill([list(k.path) for k in LOAD_ASSETS], hours)
        assert status.startswith("COMPLETED"), status
        reloaded = dict(
            conn.execute(
                "SELECT object_key, load_count FROM ingest_batches WHERE object_key = ANY(%s)",
                [list(ledger)],
            ).fetchall()
        )
        assert all(reloaded[key] > count for key, count in ledger.items()), (ledger, reloaded)
        after = conn.execute(
            "SELECT device_id, count(*) FROM telemetry WHERE device_id = ANY(%s)"
            " GROUP BY device_id",
            [e2e_ids],
        ).fetchall()
        assert dict(after) == expected

        # dbt: the marts build on this data and their tests pass.
        dbt = launcher.run("dbt_build_job", {})
        assert dbt.succeeded, dbt.errors
        marts = conn.execute(
            "SELECT device_id, sum(samples) FROM analytics.device_daily_summary"
            " WHERE device_id = ANY(%s) GROUP BY device_id ORDER BY device_id",
            [e2e_ids],
        ).fetchall()
        assert {d: int(n) for d, n in marts} == expected
