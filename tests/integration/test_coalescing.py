"""Coalescing on the embedded stack: slow load runs grow instead of queueing up.

A device publishes steadily while the warehouse is made slow on purpose (a lock on the
ingest ledger blocks every load for 40 s, as a long maintenance statement would). Load
runs per hour partition that are queued or running must never exceed one; batches that
land meanwhile wait in the sensor's cursor and go into the next run; once the lock is
gone the backlog drains, and every raw batch is in the ledger exactly once. (Runs follow
their hour, IOT_LOAD_FOLLOW_S: the run in flight during the stall loads the backlog itself
once the lock is gone.)

A stop with a load run in flight must not hold that hour either: the run's worker dies
with the stack, and the next ``up`` ends its record so the hour loads on.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.stack import Stack, stack_ca, stack_warehouse
from tests.mqtt_helpers import open_session
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.long]

DEVICE = "coalesce-meter-01"
IN_FLIGHT = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]
RUNS = """query($statuses: [RunStatus!]) { runsOrError(filter: {statuses: $statuses}) {
  ... on Runs { results { runId status tags { key value } } } } }"""
LOAD_RUNS = """{ runsOrError(filter: {pipelineName: "load_raw_batches_job"}) {
  ... on Runs { results { runId status } } } }"""


def _graphql(url: str, query: str, **variables: object) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


def _in_flight_per_partition(url: str) -> Counter[str]:
    runs = _graphql(url, RUNS, statuses=IN_FLIGHT)["runsOrError"]["results"]
    partitions = Counter()
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        if "dagster/partition" in tags:
            partitions[tags["dagster/partition"]] += 1
    return partitions


class Publisher(threading.Thread):
    """v2 telemetry, 20 messages/s, unique seq and ts, until stopped."""

    def __init__(self, session, first_seq: int = 1) -> None:
        super().__init__(daemon=True)
        self.session, self.sent, self.first_seq = session, 0, first_seq
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sent += 1
            body = {
                "v": 2,
                "device_id": DEVICE,
                "ts": dt.datetime.now(dt.UTC).isoformat(),
                "seq": self.first_seq + self.sent - 1,
                "msg_type": "telemetry",
                "measurements": [{"type": "voltage_dc", "val": 750.0 + self.sent % 10}],
            }
            self.session.client.publish(f"iot/{DEVICE}/telemetry", json.dumps(body), qos=1)


def _enrol(env: dict[str, str]) -> None:
    with psycopg.connect(stack_warehouse(env), autocommit=True) as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES (%s)", [DEVICE])
    stack_ca(env).issue_device_certificate(DEVICE)


def _start_publishing(env: dict[str, str], first_seq: int = 1) -> Publisher:
    """The device connects with its certificate and publishes until ``stop`` is set."""
    ca = stack_ca(env)
    cert, key = ca.device_paths(DEVICE)
    session = open_session(
        "127.0.0.1",
        int(env["IOT_BROKER_PORT"]),
        client_id=DEVICE,
        ca_file=ca.ca_cert_path,
        cert_file=cert,
        key_file=key,
        max_inflight=100,
    )
    assert session.connected.is_set(), session.reason
    publisher = Publisher(session, first_seq)
    publisher.start()
    return publisher


def _stop_publishing(publisher: Publisher) -> None:
    publisher.stop.set()
    publisher.join()
    publisher.session.close()


def _loaded(warehouse: str) -> int:
    with psycopg.connect(warehouse) as conn:
        return conn.execute(
            "SELECT count(*) FROM telemetry WHERE device_id = %s", [DEVICE]
        ).fetchone()[0]


def test_slow_loads_take_bigger_runs_not_a_longer_queue(stack_env):
    stack = Stack(stack_env)
    stack.start()
    url = f"http://127.0.0.1:{stack_env['IOT_DAGSTER_PORT']}"
    warehouse = stack_warehouse(stack_env)
    try:
        _enrol(stack_env)
        publisher = _start_publishing(stack_env)

        most: Counter[str] = Counter()

        def watch(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for partition, n in _in_flight_per_partition(url).items():
                    most[partition] = max(most[partition], n)
                time.sleep(0.5)

        watch(15)  # runs flow
        with psycopg.connect(warehouse) as blocker:
            blocker.execute("LOCK TABLE ingest_batches IN SHARE MODE")  # loads now wait
            watch(40)
            stuck = blocker.execute("SELECT count(*) FROM ingest_batches").fetchone()[0]
        watch(10)  # the lock is gone: the backlog drains while publishing goes on
        _stop_publishing(publisher)

        expected = publisher.sent
        deadline = time.monotonic() + 120
        with psycopg.connect(warehouse, autocommit=True) as conn:
            while time.monotonic() < deadline:
                for partition, n in _in_flight_per_partition(url).items():
                    most[partition] = max(most[partition], n)
                loaded = conn.execute(
                    "SELECT count(*) FROM telemetry WHERE device_id = %s", [DEVICE]
                ).fetchone()[0]
                if loaded >= expected:
                    break
                time.sleep(1)
            assert loaded == expected, f"{loaded} of {expected} measurements loaded"
            # Rows commit batch by batch: the last run may still be refreshing rollups.
            while _in_flight_per_partition(url) and time.monotonic() < deadline:
                time.sleep(1)
            ledger = dict(conn.execute("SELECT object_key, load_count FROM ingest_batches"))
            per_run = dict(
                conn.execute("SELECT dagster_run_id, count(*) FROM ingest_batches GROUP BY 1")
            )

        # Never more than one load run queued or running per hour.
        assert most and max(most.values()) == 1, most
        # Every raw batch the daemon wrote is in the ledger, loaded once.
        objects = Path(stack_env["IOT_HOME"]) / "objects"
        keys = {str(p.relative_to(objects)) for p in objects.rglob("*.parquet")}
        assert keys == set(ledger)
        assert set(ledger.values()) == {1}
        # Runs follow their hour, so a few runs loaded everything, and the batches that
        # landed during the stall went in as one big step of a run, not as queued runs.
        runs = _graphql(url, LOAD_RUNS)["runsOrError"]["results"]
        assert {run["status"] for run in runs} == {"SUCCESS"}
        assert set(per_run) <= {run["runId"] for run in runs}
        assert len(runs) < len(ledger) and max(per_run.values()) >= 20, per_run
        assert stuck < len(ledger)
    finally:
        assert stack.interrupt() == 0, "".join(stack.output)


def test_a_load_run_left_in_flight_by_a_stop_does_not_hold_its_hour(stack_env):
    url = f"http://127.0.0.1:{stack_env['IOT_DAGSTER_PORT']}"
    stack = Stack(stack_env)
    stack.start()
    warehouse = stack_warehouse(stack_env)  # its password is made by the first start
    try:
        _enrol(stack_env)
        before = _start_publishing(stack_env)
        wait_until(
            "a load run in flight with rows loaded",
            lambda: _loaded(warehouse) > 0 and _in_flight_per_partition(url),
            120,
        )
        _stop_publishing(before)
        # The run follows its hour until no batch came for 30 s: still in flight here.
        runs = _graphql(url, LOAD_RUNS)["runsOrError"]["results"]
        left = [run["runId"] for run in runs if run["status"] in IN_FLIGHT]
        assert left, "no load run in flight at the stop: the test would prove nothing"
    finally:
        assert stack.interrupt() == 0, "".join(stack.output)

    again = Stack(stack_env)
    again.start()
    try:
        after = _start_publishing(stack_env, first_seq=before.sent + 1)
        time.sleep(10)
        _stop_publishing(after)
        expected = before.sent + after.sent
        wait_until(
            f"{expected} measurements loaded",
            lambda: _loaded(warehouse) >= expected,
            180,
            explain=lambda: f"({_loaded(warehouse)} loaded)",
        )
        assert (loaded := _loaded(warehouse)) == expected, f"{loaded} of {expected} loaded"
        statuses = {
            r["runId"]: r["status"] for r in _graphql(url, LOAD_RUNS)["runsOrError"]["results"]
        }
        assert {statuses[run_id] for run_id in left} == {"FAILURE"}, statuses
    finally:
        assert again.interrupt() == 0, "".join(again.output)
    log = "".join(again.output)
    for run_id in left:
        assert f"run {run_id} was left in progress by the last stop: marked ended" in log, log
