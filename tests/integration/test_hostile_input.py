"""Hostile and odd traffic from enrolled devices through the real stack (issue 11).

Devices publish over mTLS to Mosquitto; a real ingest daemon (child process) writes raw
batches to the S3 server (moto); Dagster materialises the load and rollup assets into
PostgreSQL. Every message ends as loaded, de-duplicated (counted), a reject with a reason
in ``decode_rejects``, or refused by the broker with a reason the device sees — and no
run fails.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time

import dagster as dg
import psycopg
import pytest

from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.objectstore import S3Store
from iot_platform.rawbatch import BatchKey
from tests.fixtures.ingest import ingest_env, s3_store_env, stored_rows
from tests.integration.test_pipeline import ASSETS, _warehouse
from tests.mqtt_helpers import device_session

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 135  # MQTT v5 PUBACK reason code


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _telemetry(device_id: str, seq: int, ts: str, value: float, **extra) -> bytes:
    body = {
        "v": 2,
        "device_id": device_id,
        "ts": ts,
        "seq": seq,
        "measurements": [{"type": "voltage_dc", "val": value, "unit": "V"}],
        **extra,
    }
    return json.dumps(body).encode()


class Stack:
    """Broker + daemon + S3 bucket + warehouse for one test, and the helpers it uses."""

    def __init__(self, mosquitto, ingest_factory, s3_server, postgres_db, tmp_path) -> None:
        self.mosquitto = mosquitto
        self.bucket = f"hostile-{secrets.token_hex(4)}"
        self.store = S3Store(
            s3_server.endpoint, s3_server.access_key, s3_server.secret_key, self.bucket
        )
        self.store.ensure_ready()
        env = ingest_env(
            mosquitto,
            tmp_path / "spool",
            INGEST_INSTANCE_ID=f"hostile{secrets.token_hex(3)}",
            **{**s3_store_env(s3_server), "IOT_S3_BUCKET": self.bucket},
        )
        self.daemon = ingest_factory(env)
        self.warehouse = _warehouse(postgres_db)
        self.resources = {
            "warehouse": self.warehouse,
            "object_store": ObjectStoreResource(
                backend="s3",
                endpoint=s3_server.endpoint,
                bucket=self.bucket,
                access_key=s3_server.access_key,
                secret_key=s3_server.secret_key,
            ),
        }
        self.tmp_path = tmp_path
        with self.warehouse.connect() as conn:  # migrates
            conn.execute("SELECT 1")

    def device(self, prefix: str = "hostile") -> str:
        device_id = f"{prefix}-{secrets.token_hex(4)}"
        self.mosquitto.ca.issue_device_certificate(device_id)
        with self.warehouse.connect() as conn:
            conn.execute("INSERT INTO devices (device_id) VALUES (%s)", [device_id])
        return device_id

    def publish(self, device_id: str, messages: list[tuple[str, bytes]]) -> list[int | None]:
        """QoS 1, in order; returns each PUBACK reason code (None: no PUBACK)."""
        session = device_session(
            self.mosquitto, device_id, client_id=f"{device_id}-{time.monotonic_ns()}"
        )
        assert session.connected.is_set(), session.reason
        infos = [session.client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(10)
        codes = [session.puback_codes.get(info.mid) for info in infos]
        session.close()
        return codes

    def rows_of(self, device_ids: list[str]) -> list[tuple[str, bytes]]:
        rows = stored_rows(self.store)
        return [
            (t, p)
            for t, p in zip(
                rows.column("topic").to_pylist(), rows.column("payload").to_pylist(), strict=True
            )
            if t.split("/")[1] in device_ids
        ]

    def wait_for(self, device_ids: list[str], count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.rows_of(device_ids)) < count:
            assert time.monotonic() < deadline, self.rows_of(device_ids)
            time.sleep(0.25)

    def load_everything(self) -> None:
        """One run per receive hour, as the sensor would request them; all must succeed."""
        keys = sorted(info.key for info in self.store.list("raw/v1/"))
        hours = sorted({BatchKey.parse(k).partition_key for k in keys})
        with dg.instance_for_test(temp_dir=str(self.tmp_path)) as instance:
            for hour in hours:
                manifest = [k for k in keys if BatchKey.parse(k).partition_key == hour]
                result = dg.materialize(
                    ASSETS,
                    partition_key=hour,
                    run_config={"ops": {"load_raw_batches": {"config": {"batch_keys": manifest}}}},
                    resources=self.resources,
                    instance=instance,
                    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(ASSETS[0].key),
                )
                assert result.success

    def query(self, sql: str, params=None) -> list[tuple]:
        with self.warehouse.connect() as conn:
            return conn.execute(sql, params).fetchall()

    def rejects(self, device_id: str) -> list[tuple]:
        """(topic, reason, detail) of the device's rejects. Only its own: the shared test
        broker replays other tests' retained messages to every new ingest session."""
        return self.query(
            "SELECT topic, reason, detail FROM decode_rejects WHERE topic LIKE %s"
            " ORDER BY received_at, id",
            [f"%/{device_id}/%"],
        )


@pytest.fixture
def stack(mosquitto, ingest_factory, s3_server, postgres_db, tmp_path) -> Stack:
    return Stack(mosquitto, ingest_factory, s3_server, postgres_db, tmp_path)


def test_implausible_device_times_are_rejected_and_rollups_stay_bounded(stack):
    stack.daemon.start()
    dev = stack.device()
    telemetry, status = f"iot/{dev}/telemetry", f"iot/{dev}/status"
    sent = [
        (telemetry, _telemetry(dev, 1, "9999-12-31T23:59:59Z", 1.0)),
        (telemetry, _telemetry(dev, 2, "1970-01-01T00:00:00Z", 2.0)),
        (telemetry, _telemetry(dev, 3, "2026-06-30T23:59:60Z", 3.0)),  # leap second
        (
            status,
            json.dumps(
                {"v": 2, "device_id": dev, "ts": "9999-12-31T23:59:59Z", "status": "online"}
            ).encode(),
        ),
        (telemetry, _telemetry(dev, 4, _now(), 4.0)),
    ]
    assert stack.publish(dev, sent) == [0] * len(sent)
    stack.wait_for([dev], len(sent))
    assert stack.daemon.terminate() == 0
    stack.load_everything()  # includes telemetry_1m/1h/1d: no OverflowError, no 1970 rebuild

    rejects = stack.rejects(dev)
    assert [(t, r) for t, r, _ in rejects] == [
        (telemetry, "ts_out_of_range"),
        (telemetry, "ts_out_of_range"),
        (telemetry, "ts_out_of_range"),
        (status, "ts_out_of_range"),
    ]
    assert "9999-12-31T23:59:59Z" in rejects[0][2] and "1970-01-01" in rejects[1][2]
    assert "leap second" in rejects[2][2]
    assert stack.query("SELECT value FROM telemetry WHERE device_id = %s", [dev]) == [(4.0,)]
    assert stack.query("SELECT count(*) FROM device_events WHERE device_id = %s", [dev]) == [(0,)]
    ((lo, hi),) = stack.query("SELECT min(refresh_from), max(refresh_to) FROM ingest_batches")
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(hours=1) < lo <= hi < now + dt.timedelta(minutes=1)
    assert stack.query("SELECT count(*) FROM telemetry_1d WHERE device_id = %s", [dev]) == [(1,)]


def test_the_same_seq_across_batches_and_a_daemon_kill_keeps_the_first_stored(stack):
    stack.daemon.start()
    dev = stack.device()
    topic = f"iot/{dev}/telemetry"
    first = _telemetry(dev, 100, _now(), 1.0)
    assert stack.publish(dev, [(topic, first)]) == [0]
    stack.wait_for([dev], 1)  # durable in a first batch
    time.sleep(1.0)
    changed = _telemetry(dev, 100, _now(), 2.0)  # same seq, other ts and value
    assert stack.publish(dev, [(topic, changed)]) == [0]
    stack.wait_for([dev], 2)  # a second batch
    stack.daemon.kill9()
    time.sleep(1.0)
    again = _telemetry(dev, 100, _now(), 3.0)  # queued by the broker while the daemon is down
    assert stack.publish(dev, [(topic, again), (topic, _telemetry(dev, 101, _now(), 4.0))]) == [
        0,
        0,
    ]
    stack.daemon.start()
    stack.wait_for([dev], 4)
    assert stack.daemon.terminate() == 0
    keys = {info.key for info in stack.store.list("raw/v1/")}
    assert len(keys) >= 3  # the three copies of seq 100 landed in three batches
    stack.load_everything()
    assert stack.query("SELECT value FROM telemetry WHERE device_id = %s ORDER BY ts", [dev]) == [
        (1.0,),
        (4.0,),
    ]
    assert stack.query("SELECT sum(duplicate_rows) FROM ingest_batches") == [(2,)]
    assert stack.query(
        "SELECT count(*) FROM device_messages WHERE device_id = %s AND seq = 100", [dev]
    ) == [(3,)]  # the evidence for the sequence duplicate check


def test_oversized_payloads_reach_the_raw_batch_and_are_rejected_with_an_excerpt(stack):
    stack.daemon.start()
    dev = stack.device()
    topic = f"iot/{dev}/telemetry"
    big = _telemetry(dev, 1, _now(), 1.0, pad="x" * (300 * 1024))  # over the decoder's 256 KiB
    small = _telemetry(dev, 2, _now(), 2.0)
    assert stack.publish(dev, [(topic, big), (topic, small)]) == [0, 0]
    stack.wait_for([dev], 2)
    assert stack.daemon.terminate() == 0
    assert stack.rows_of([dev]) == [(topic, big), (topic, small)]
    stack.load_everything()
    ((reason, detail, excerpt),) = stack.query(
        "SELECT reason, detail, payload_excerpt FROM decode_rejects WHERE topic LIKE %s",
        [f"%/{dev}/%"],
    )
    assert reason == "oversized" and str(len(big)) in detail
    assert excerpt == big[:256].decode()
    assert stack.query("SELECT value FROM telemetry WHERE device_id = %s", [dev]) == [(2.0,)]


def test_topics_nobody_consumes_are_refused_by_the_broker(stack):
    stack.daemon.start()
    dev = stack.device()
    payload = _telemetry(dev, 1, _now(), 1.0)
    unconsumed = [
        f"iot/{dev}/telemetry/extra",
        f"iot/{dev}/Telemetry",
        f"iot/{dev}/command",
        f"devices/{dev}/temp/extra",
    ]
    codes = stack.publish(
        dev, [(t, payload) for t in unconsumed] + [(f"iot/{dev}/telemetry", payload)]
    )
    assert codes == [NOT_AUTHORIZED] * 4 + [0]
    stack.wait_for([dev], 1)
    time.sleep(1.0)
    assert stack.daemon.terminate() == 0
    assert stack.rows_of([dev]) == [(f"iot/{dev}/telemetry", payload)]
    stack.load_everything()
    assert stack.query("SELECT count(*) FROM telemetry WHERE device_id = %s", [dev]) == [(1,)]
    assert stack.rejects(dev) == []


def test_duplicate_keys_and_huge_numbers_get_measurement_level_verdicts(stack):
    stack.daemon.start()
    dev = stack.device()
    ts = _now()
    hello = (
        json.dumps(
            {"v": 2, "device_id": dev, "ts": ts, "seq": 1, "msg_type": "hello", "fw_version": "1"}
        )[:-1]
        + ', "fw_version": "2"}'
    )
    huge = json.dumps(
        {
            "v": 2,
            "device_id": dev,
            "ts": ts,
            "seq": 2,
            "measurements": [
                {"type": "voltage_dc", "val": "HUGE"},
                {"type": "current_dc", "val": 12.5},
            ],
        }
    ).replace('"HUGE"', "9" * 5000)
    sent = [
        (f"iot/{dev}/telemetry", b'{"v":2,"seq":'),  # a malformed neighbour: slow path
        (f"iot/{dev}/hello", hello.encode()),
        (f"iot/{dev}/telemetry", huge.encode()),
    ]
    assert stack.publish(dev, sent) == [0, 0, 0]
    stack.wait_for([dev], len(sent))
    assert stack.daemon.terminate() == 0
    stack.load_everything()
    rejects = stack.rejects(dev)
    assert [(t.rsplit("/", 1)[1], r) for t, r, _ in rejects] == [
        ("telemetry", "malformed_json"),
        ("hello", "malformed_json"),
        ("telemetry", "value_out_of_range"),
    ]
    assert "duplicate key 'fw_version'" in rejects[1][2]
    assert "1 of 2 measurements dropped" in rejects[2][2]
    assert stack.query("SELECT metric, value FROM telemetry WHERE device_id = %s", [dev]) == [
        ("current_dc", 12.5)
    ]
    assert stack.query("SELECT count(*) FROM device_events WHERE device_id = %s", [dev]) == [(0,)]


def test_a_device_id_differing_only_in_case_is_refused_by_the_registry(stack):
    dev = stack.device("CaseDev")
    with pytest.raises(psycopg.errors.UniqueViolation), stack.warehouse.connect() as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES (%s)", [dev.lower()])
