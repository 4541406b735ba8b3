"""`iot-platform up` as the README runs it: every service answers, Ctrl-C leaves nothing."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from iot_platform.objectstore import LocalDirectoryStore
from tests.fixtures.ingest import stored_rows
from tests.fixtures.stack import Stack, alive, cmdline, descendants, stack_ca, stack_warehouse
from tests.mqtt_helpers import open_session

pytestmark = [pytest.mark.integration, pytest.mark.long]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_daemon_healthy(url: str, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    statuses: list[dict] = []
    while time.monotonic() < deadline:
        body = _graphql(
            url,
            "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }",
        )
        if body.get("data"):
            statuses = body["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
            if statuses and all(s["healthy"] for s in statuses if s["required"]):
                return statuses
        time.sleep(2)
    pytest.fail(f"dagster daemon not healthy: {statuses or body}")


def _wait_for(conn: psycopg.Connection, count_query: str, timeout: float = 120) -> None:
    """Poll until the query counts at least one row (the sensor ticks every 10 s)."""
    deadline = time.monotonic() + timeout
    while conn.execute(count_query).fetchone()[0] == 0:
        conn.commit()
        if time.monotonic() > deadline:
            pytest.fail(f"nothing for {count_query!r} after {timeout}s")
        time.sleep(1)


def test_up_serves_every_service_and_ctrl_c_leaves_no_process(stack_env):
    stack = Stack(stack_env)
    summary = stack.start()
    assert stack.proc is not None
    children = descendants(stack.proc.pid)
    try:
        url = re.search(r"Dagster UI\s+(http://\S+)", summary).group(1)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        _wait_daemon_healthy(url)

        home = Path(stack_env["IOT_HOME"])
        warehouse = stack_warehouse(stack_env)
        with psycopg.connect(warehouse) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        ca = stack_ca(stack_env)
        device_id = f"stack-{secrets.token_hex(3)}"
        issued = ca.issue_device_certificate(device_id)
        cert, key = ca.device_paths(device_id)
        port = int(stack_env["IOT_BROKER_PORT"])
        session = open_session(
            "127.0.0.1",
            port,
            client_id=device_id,
            ca_file=ca.ca_cert_path,
            cert_file=cert,
            key_file=key,
        )
        assert session.connected.is_set(), session.reason
        session.client.publish(f"devices/{device_id}/temperature", b"21.5", qos=1).wait_for_publish(
            5
        )
        session.close()
        # The embedded ingest daemon turns it into a raw batch in the local store.
        store = LocalDirectoryStore(home / "objects")
        deadline = time.monotonic() + 30
        while not (rows := stored_rows(store)).num_rows and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rows.column("payload").to_pylist() == [b"21.5"]

        # The sensor loads it: unregistered, so kept as a reject; once registered, the
        # device's telemetry reaches the warehouse and the rollups with nothing else to start.
        with psycopg.connect(warehouse) as conn:
            _wait_for(conn, "SELECT count(*) FROM decode_rejects WHERE reason = 'unknown_device'")
            conn.execute("INSERT INTO devices (device_id) VALUES (%s)", [device_id])
            conn.commit()
            envelope = json.dumps(
                {
                    "v": 2,
                    "device_id": device_id,
                    # device time must be plausible against receive time (ts_out_of_range)
                    "ts": dt.datetime.now(dt.UTC).isoformat(),
                    "seq": 1,
                    "msg_type": "telemetry",
                    "measurements": [{"type": "voltage_dc", "val": 756.3}],
                }
            )
            session = open_session(
                "127.0.0.1",
                port,
                client_id=device_id,
                ca_file=ca.ca_cert_path,
                cert_file=cert,
                key_file=key,
            )
            session.client.publish(f"iot/{device_id}/telemetry", envelope, qos=1).wait_for_publish(
                5
            )
            session.close()
            _wait_for(conn, "SELECT count(*) FROM telemetry_1m WHERE metric = 'voltage_dc'")
            assert conn.execute("SELECT device_id, value FROM telemetry").fetchall() == [
                (device_id, 756.3)
            ]

        ca.write_crl(revoke_serials={int(issued.serial_hex, 16): x509.ReasonFlags.key_compromise})
        reload = subprocess.run(
            [sys.executable, "-m", "iot_platform.cli", "broker", "reload"],
            env=stack_env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert reload.returncode == 0, reload.stderr
        time.sleep(1)
        refused = open_session(
            "127.0.0.1",
            port,
            client_id=f"{device_id}-2",
            ca_file=ca.ca_cert_path,
            cert_file=cert,
            key_file=key,
        )
        assert not refused.connected.is_set()
    finally:
        code = stack.interrupt()
    assert code == 0, "".join(stack.output)
    assert len(children) >= 5
    deadline = time.monotonic() + 15
    while (survivors := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [cmdline(pid) for pid in survivors] == []

    # A second start reuses the data: no initdb, no new CA, same databases.
    ca_before = Path(stack_env["IOT_CERTS_DIR"], "ca.crt").read_bytes()
    again = Stack(stack_env)
    again.start()
    try:
        log = "".join(again.output)
        assert "created database" not in log and "PKI: created" not in log
        assert Path(stack_env["IOT_CERTS_DIR"], "ca.crt").read_bytes() == ca_before
    finally:
        assert again.interrupt() == 0
