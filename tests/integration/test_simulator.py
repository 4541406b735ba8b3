"""The device simulator speaks every topic family over mTLS and injects its faults."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from iot_platform.simulator import Fleet, plan_fleet
from tests.mqtt_helpers import ingest_session

pytestmark = pytest.mark.integration


def test_fleet_publishes_every_family_with_injected_faults(mosquitto):
    devices = plan_fleet(4, prefix="simtest", send_interval_s=0.2)
    meter = devices[0].device_id  # kinds cycle: meter-dc, meter-ac, sensor, controller
    devices[0].faults = frozenset({"gap", "duplicate", "malformed", "skew"})
    for device in devices:
        device.hello_interval_s = 1.0
        mosquitto.ca.issue_device_certificate(device.device_id)
    listener = ingest_session(mosquitto, client_id="sim-listener")
    listener.client.subscribe([("iot/#", 1), ("devices/#", 1), ("tele/#", 1), ("stat/#", 1)])
    time.sleep(0.5)
    fleet = Fleet(
        devices,
        host=mosquitto.host,
        port=mosquitto.port,
        ca_file=mosquitto.ca.ca_cert_path,
        credentials=lambda d: mosquitto.ca.device_paths(d.device_id),
    )
    fleet.connect()
    report = fleet.run(duration_s=3)
    fleet.close()
    time.sleep(1)
    listener.close()

    topics = {m.topic.split("/")[0] + "/" + m.topic.split("/")[-1] for m in listener.messages}
    assert {
        "iot/telemetry",
        "iot/hello",
        "iot/status",
        "devices/temperature",
        "tele/relays",
        "stat/power",
    } <= topics
    mine = [m for m in listener.messages if m.topic == f"iot/{meter}/telemetry"]
    bodies = [m.payload for m in mine]
    assert b'{"v":2,"seq":' in bodies  # malformed
    seqs = [json.loads(b)["seq"] for b in bodies if b != b'{"v":2,"seq":']
    assert len(seqs) > len(set(seqs))  # duplicates
    assert set(report.skipped_seq[meter]).isdisjoint(seqs)  # gaps
    first = json.loads(next(b for b in bodies if b != b'{"v":2,"seq":'))
    skew = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(first["ts"])
    assert skew > dt.timedelta(minutes=9)  # clock skew
    assert report.published["telemetry"] > 0 and report.good_measurements[meter] > 0
