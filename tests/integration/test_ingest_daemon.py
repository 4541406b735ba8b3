"""The ingest daemon against the real broker (mTLS) and real stores: nothing is lost."""

from __future__ import annotations

import json
import random
import secrets
import signal
import threading
import time

import pyarrow.compute as pc
import pytest

from iot_platform.objectstore import LocalDirectoryStore, S3Store
from iot_platform.rawbatch import BatchKey
from iot_platform.settings import PlatformSettings
from tests.fixtures.ingest import (
    ingest_env,
    local_store_env,
    s3_store_env,
    stored_rows,
    wait_for_rows,
)
from tests.mqtt_helpers import device_session

pytestmark = pytest.mark.integration


def _device(mosquitto, prefix: str = "dev") -> str:
    device_id = f"{prefix}-{secrets.token_hex(4)}"
    mosquitto.ca.issue_device_certificate(device_id)
    return device_id


def _publish_numbered(
    mosquitto, device_id: str, count: int, *, start: int = 0, rate_per_s: float | None = None
) -> None:
    """QoS 1 messages with unique ids; returns once the broker acknowledged every one."""
    session = device_session(mosquitto, device_id, client_id=f"{device_id}-pub", max_inflight=500)
    assert session.connected.is_set(), session.reason
    infos = []
    started = time.monotonic()
    for n in range(start, start + count):
        body = json.dumps({"v": 2, "device_id": device_id, "seq": n, "pad": "x" * 120})
        infos.append(session.client.publish(f"iot/{device_id}/telemetry", body, qos=1))
        if rate_per_s and n % 200 == 0:
            ahead = (n - start) / rate_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(120)
    session.close()


def _seqs(table) -> set[int]:
    """The numbered messages' ids (the shared test broker may also deliver others' retained)."""
    return {
        json.loads(p)["seq"]
        for t, p in zip(
            table.column("topic").to_pylist(), table.column("payload").to_pylist(), strict=True
        )
        if t.endswith("/telemetry") and b'"seq"' in p
    }


def test_every_topic_family_round_trips_byte_exact(mosquitto, ingest_factory, tmp_path):
    store = LocalDirectoryStore(tmp_path / "objects")
    daemon = ingest_factory(
        ingest_env(
            mosquitto,
            tmp_path / "spool",
            INGEST_INSTANCE_ID="families",
            **local_store_env(tmp_path / "objects"),
        )
    ).start()
    # the fast PUBLISH reader is what carries the traffic below (verified paho-mqtt)
    assert daemon.health()["fast_path"] is True
    assert daemon.metrics()["ingest_fast_path"] == 1
    meter, sensor = _device(mosquitto, "meter"), _device(mosquitto, "sensor")
    controller = f"f2-{secrets.token_hex(6)}"
    mosquitto.ca.issue_device_certificate(controller)
    sent = [
        (
            meter,
            f"iot/{meter}/telemetry",
            b'{"v":2,"measurements":[{"type":"voltage_dc","val":756.3}]}',
            1,
            False,
        ),
        (meter, f"iot/{meter}/hello", b'{"v":2,"msg_type":"hello","fw_version":"2.1.0"}', 1, False),
        (meter, f"iot/{meter}/status", b'{"v":2,"status":"online"}', 1, True),
        (meter, f"iot/{meter}/command/ack", b'{"v":2,"cmd_id":"c1","result":"ok"}', 1, False),
        (
            meter,
            f"iot/{meter}/ota/status",
            b'{"v":2,"ota_state":"done","progress_pct":100}',
            0,
            False,
        ),
        (sensor, f"devices/{sensor}/temperature", b"23.5", 1, False),
        (controller, f"tele/{controller}/auto/1/relay", b"0101", 1, False),
        (controller, f"stat/{controller}/auto/1/power", b"\x00\xffbinary\x00", 1, False),
    ]
    before_us = time.time_ns() // 1000
    sessions = {d: device_session(mosquitto, d) for d in (meter, sensor, controller)}
    for device_id, topic, payload, qos, retain in sent:
        sessions[device_id].client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(
            5
        )
    rows = wait_for_rows(store, len(sent))
    after_us = time.time_ns() // 1000
    # Clear the retained status so the session-wide test broker does not replay it later.
    sessions[meter].client.publish(f"iot/{meter}/status", b"", qos=1, retain=True).wait_for_publish(
        5
    )
    for s in sessions.values():
        s.close()
    assert daemon.terminate() == 0

    got = sorted(
        zip(
            rows.column("topic").to_pylist(),
            rows.column("payload").to_pylist(),
            rows.column("qos").to_pylist(),
            rows.column("retain").to_pylist(),
            strict=True,
        )
    )
    # A retained message is delivered live with retain=False (MQTT 3.3.1-9 for live traffic).
    assert got == sorted((t, p, q, False) for _, t, p, q, _ in sent)
    received = pc.cast(rows.column("received_at"), "int64").to_pylist()
    assert all(before_us <= r <= after_us for r in received)
    for info in store.list("raw/v1/"):
        key = BatchKey.parse(info.key)
        assert key.instance == "families"


def _wait_for_seqs(store, expected: set[int], timeout: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (seqs := _seqs(stored_rows(store))) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return seqs


def test_kill_9_at_random_moments_loses_nothing(mosquitto, ingest_factory, tmp_path):
    total = 50_000
    store = LocalDirectoryStore(tmp_path / "objects")
    env = ingest_env(
        mosquitto,
        tmp_path / "spool",
        INGEST_INSTANCE_ID="crashy",
        INGEST_MAX_ROWS="2000",
        **local_store_env(tmp_path / "objects"),
    )
    daemon = ingest_factory(env).start()
    device_id = _device(mosquitto, "stream")
    publisher = threading.Thread(
        target=_publish_numbered, args=(mosquitto, device_id, total), kwargs={"rate_per_s": 4000}
    )
    publisher.start()
    rng = random.Random(7)
    kills = 0
    while publisher.is_alive():
        time.sleep(rng.uniform(1.0, 3.0))
        daemon.kill9()
        kills += 1
        time.sleep(rng.uniform(0.0, 1.0))
        daemon.start()
    publisher.join()
    _wait_for_seqs(store, set(range(total)), timeout=90)
    assert daemon.terminate() == 0
    rows = stored_rows(store)
    seqs = _seqs(rows)
    print(f"kills={kills} rows={rows.num_rows} distinct={len(seqs)}")
    assert kills >= 3
    assert len(seqs) == total, f"missing {total - len(seqs)} of {total}"


def test_s3_outage_spools_then_drains_without_loss(
    mosquitto, ingest_factory, tmp_path, s3_server_factory
):
    server = s3_server_factory()
    store = S3Store(server.endpoint, server.access_key, server.secret_key, server.bucket)
    daemon = ingest_factory(
        ingest_env(
            mosquitto, tmp_path / "spool", INGEST_INSTANCE_ID="s3out", **s3_store_env(server)
        )
    ).start()
    device_id = _device(mosquitto, "outage")
    _publish_numbered(mosquitto, device_id, 500)
    assert _wait_for_seqs(store, set(range(500))) == set(range(500))

    server.process.signal(signal.SIGSTOP)
    try:
        _publish_numbered(mosquitto, device_id, 1500, start=500, rate_per_s=100)  # ~15 s
        deadline = time.monotonic() + 30
        while daemon.metrics().get("ingest_spool_files", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        during = daemon.metrics()
        assert during["ingest_spool_files"] > 0, during
        remaining = 30 - 15
        time.sleep(remaining)
    finally:
        server.process.signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while daemon.metrics().get("ingest_spool_files", 1) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    after = daemon.metrics()
    assert after["ingest_spool_files"] == 0
    assert after["ingest_spool_drained_total"] > 0
    assert daemon.terminate() == 0
    assert _seqs(stored_rows(store)) == set(range(2000))


def test_full_spool_stops_acking_and_resumes_without_loss(
    mosquitto, ingest_factory, tmp_path, s3_server_factory
):
    server = s3_server_factory()
    store = S3Store(server.endpoint, server.access_key, server.secret_key, server.bucket)
    daemon = ingest_factory(
        ingest_env(
            mosquitto,
            tmp_path / "spool",
            INGEST_INSTANCE_ID="full",
            INGEST_SPOOL_MAX_BYTES="0",
            **s3_store_env(server),
        )
    ).start()
    device_id = _device(mosquitto, "budget")
    server.process.signal(signal.SIGSTOP)
    try:
        _publish_numbered(mosquitto, device_id, 300)
        deadline = time.monotonic() + 30
        while daemon.metrics().get("ingest_backpressure", 0) != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        held = daemon.metrics()
        assert held["ingest_backpressure"] == 1
        assert held.get("ingest_messages_acknowledged_total", 0) == 0
        assert held["ingest_spool_files"] == 0
    finally:
        server.process.signal(signal.SIGCONT)
    seqs = _wait_for_seqs(store, set(range(300)))
    deadline = time.monotonic() + 30
    while (
        daemon.metrics()["ingest_messages_acknowledged_total"] < 300 and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert daemon.metrics()["ingest_backpressure"] == 0
    assert seqs == set(range(300))
    assert daemon.terminate() == 0


def test_sigterm_flushes_a_partial_batch(mosquitto, ingest_factory, tmp_path):
    store = LocalDirectoryStore(tmp_path / "objects")
    daemon = ingest_factory(
        ingest_env(
            mosquitto,
            tmp_path / "spool",
            INGEST_INSTANCE_ID="term",
            INGEST_MAX_AGE_S="600",
            INGEST_MAX_ROWS="10000",
            **local_store_env(tmp_path / "objects"),
        )
    ).start()
    device_id = _device(mosquitto, "partial")
    _publish_numbered(mosquitto, device_id, 25)
    time.sleep(1.0)
    assert stored_rows(store).num_rows == 0  # still buffered: age and size limits are far away
    assert daemon.terminate(timeout=30) == 0
    assert _seqs(stored_rows(store)) == set(range(25))


def test_two_daemons_share_the_stream_without_loss(mosquitto, ingest_factory, tmp_path):
    store = LocalDirectoryStore(tmp_path / "objects")
    daemons = [
        ingest_factory(
            ingest_env(
                mosquitto,
                tmp_path / f"spool-{i}",
                INGEST_INSTANCE_ID=f"share{i}",
                INGEST_SHARE_GROUP="pair",
                **local_store_env(tmp_path / "objects"),
            ),
            name=f"share{i}",
        ).start()
        for i in range(2)
    ]
    device_id = _device(mosquitto, "shared")
    _publish_numbered(mosquitto, device_id, 4000)
    _wait_for_seqs(store, set(range(4000)))
    for daemon in daemons:
        assert daemon.terminate() == 0
    assert _seqs(stored_rows(store)) == set(range(4000))
    per_instance = {BatchKey.parse(i.key).instance for i in store.list("raw/v1/")}
    assert per_instance == {"share0", "share1"}


def test_one_payload_limit_broker_refuses_above_it_daemon_keeps_everything_below(
    mosquitto, ingest_factory, tmp_path
):
    """Issue 11: one limit (IOT_MQTT_MAX_PAYLOAD_BYTES, 1 MiB by default) for broker and
    daemon. Above it the device gets a reason code; below it every payload reaches the raw
    batch, also those the decoder will refuse as oversized (256 KiB)."""
    limit = PlatformSettings.from_env().mqtt_max_payload_bytes
    assert mosquitto.broker.config.message_size_limit == limit
    store = LocalDirectoryStore(tmp_path / "objects")
    daemon = ingest_factory(
        ingest_env(
            mosquitto,
            tmp_path / "spool",
            INGEST_INSTANCE_ID="big",
            **local_store_env(tmp_path / "objects"),
        )
    ).start()
    device_id = _device(mosquitto, "big")
    session = device_session(mosquitto, device_id)
    topic = f"iot/{device_id}/telemetry"
    sent = [b"x" * (300 * 1024), b"y" * limit, b'{"ok":1}']
    infos = [session.client.publish(topic, payload, qos=1) for payload in sent]
    for info in infos:
        info.wait_for_publish(10)
    assert [session.puback_codes.get(info.mid) for info in infos] == [0, 0, 0]
    session.close()
    too_big = device_session(mosquitto, device_id, client_id=f"{device_id}-big")
    too_big.disconnected.clear()
    too_big.client.publish(topic, b"z" * (limit + 1), qos=1)
    # Mosquitto 2.0.11 refuses it by disconnecting the device (reason "Protocol error")
    assert too_big.disconnected.wait(10), "the broker accepted a payload over the limit"
    assert too_big.disconnect_reason
    too_big.close()
    wait_for_rows(store, 3)
    time.sleep(1)
    rows = stored_rows(store)
    mine = [
        p
        for t, p in zip(
            rows.column("topic").to_pylist(), rows.column("payload").to_pylist(), strict=True
        )
        if device_id in t
    ]
    assert mine == sent  # byte-exact, nothing dropped at ingest, the oversize one refused
    assert daemon.terminate() == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("INGEST_MAX_ROWS", "lots"),
        ("INGEST_MAX_AGE_S", "-1"),
        ("INGEST_INSTANCE_ID", "a/b"),
        ("IOT_OBJECT_STORE", "ftp"),
        ("INGEST_MAX_PAYLOAD_BYTES", "1024"),  # gone: the broker's limit is the one limit
    ],
)
def test_invalid_configuration_fails_at_start_naming_the_setting(
    mosquitto, tmp_path, setting, value
):
    import subprocess
    import sys

    env = ingest_env(mosquitto, tmp_path / "spool", **local_store_env(tmp_path / "o"))
    env[setting] = value
    result = subprocess.run(
        [sys.executable, "-m", "ingest_daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert setting in result.stderr
