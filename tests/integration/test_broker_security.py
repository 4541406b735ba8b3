"""The broker enforces mTLS, the CRL and per-certificate topic ACLs (DESIGN §4)."""

from __future__ import annotations

import datetime as dt
import secrets
import time

import pytest
from cryptography import x509

from iot_platform.pki import CertificateAuthority, init_pki, utcnow
from tests.mqtt_helpers import device_session, ingest_session, open_session

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_device_publishes_own_topic_and_ingest_receives(mosquitto):
    device_id = _unique("meter")
    mosquitto.ca.issue_device_certificate(device_id)
    ingest = ingest_session(mosquitto)
    assert ingest.connected.is_set(), ingest.reason
    ingest.client.subscribe(f"iot/{device_id}/#", qos=1)
    assert ingest.subscribed.wait(5)
    assert ingest.suback_codes == [1]

    device = device_session(mosquitto, device_id)
    assert device.connected.is_set(), device.reason
    info = device.client.publish(f"iot/{device_id}/telemetry", b'{"v":2}', qos=1)
    info.wait_for_publish(5)
    received = ingest.wait_for_messages(1)
    assert [(m.topic, m.payload) for m in received] == [(f"iot/{device_id}/telemetry", b'{"v":2}')]
    device.close()
    ingest.close()


def test_client_without_certificate_is_refused(mosquitto):
    session = open_session(
        mosquitto.host,
        mosquitto.port,
        client_id="anon",
        ca_file=mosquitto.ca.ca_cert_path,
        cert_file=None,
        key_file=None,
    )
    assert not session.connected.is_set()
    assert session.disconnected.is_set()


def test_certificate_from_another_ca_is_refused(mosquitto, tmp_path):
    rogue = CertificateAuthority(tmp_path / "rogue", secrets.token_urlsafe(16))
    init_pki(rogue, broker_hosts=["localhost"], services=[], crl_days=1)
    device_id = _unique("rogue")
    rogue.issue_device_certificate(device_id)
    cert, key = rogue.device_paths(device_id)
    session = open_session(
        mosquitto.host,
        mosquitto.port,
        client_id=device_id,
        ca_file=mosquitto.ca.ca_cert_path,
        cert_file=cert,
        key_file=key,
    )
    assert not session.connected.is_set()


def test_expired_certificate_is_refused(mosquitto):
    device_id = _unique("expired")
    mosquitto.ca.issue_device_certificate(
        device_id, days=1, not_before=utcnow() - dt.timedelta(days=3)
    )
    session = device_session(mosquitto, device_id)
    assert not session.connected.is_set()


def test_revoked_certificate_is_refused_after_crl_reload(mosquitto):
    device_id = _unique("revoked")
    issued = mosquitto.ca.issue_device_certificate(device_id)
    before = device_session(mosquitto, device_id)
    assert before.connected.is_set(), before.reason
    before.close()

    mosquitto.ca.write_crl(
        revoke_serials={int(issued.serial_hex, 16): x509.ReasonFlags.key_compromise}
    )
    mosquitto.reload()
    deadline = time.monotonic() + 10
    while True:  # SIGHUP is asynchronous: poll until new connections are refused
        session = device_session(mosquitto, device_id, client_id=_unique("retry"))
        if not session.connected.is_set():
            break
        session.close()
        assert time.monotonic() < deadline, "revoked certificate still accepted after reload"
        time.sleep(0.2)

    other_id = _unique("still-valid")
    mosquitto.ca.issue_device_certificate(other_id)
    other = device_session(mosquitto, other_id)
    assert other.connected.is_set(), "revoking one device must not lock out others"
    other.close()


def test_device_cannot_publish_into_another_devices_topic(mosquitto):
    attacker_id, victim_id = _unique("attacker"), _unique("victim")
    for device_id in (attacker_id, victim_id):
        mosquitto.ca.issue_device_certificate(device_id)
    ingest = ingest_session(mosquitto)
    ingest.client.subscribe("#", qos=1)
    assert ingest.subscribed.wait(5)

    attacker = device_session(mosquitto, attacker_id)
    assert attacker.connected.is_set(), attacker.reason
    forged = [
        f"iot/{victim_id}/telemetry",
        f"devices/{victim_id}/temp",
        f"tele/{victim_id}/m/1/c",
        "iot/telemetry",
        "cmnd/other/x",
    ]
    for topic in forged:
        attacker.client.publish(topic, b"forged", qos=1)
    # A message the attacker IS allowed to send proves the pipe works and orders after the rest.
    attacker.client.publish(f"iot/{attacker_id}/telemetry", b"own", qos=1).wait_for_publish(5)
    received = ingest.wait_for_messages(1)
    time.sleep(0.5)
    assert [m.topic for m in received] == [f"iot/{attacker_id}/telemetry"]
    assert [m.payload for m in ingest.messages] == [b"own"]
    attacker.close()
    ingest.close()


def test_device_cannot_subscribe_to_other_devices_traffic(mosquitto):
    spy_id, victim_id = _unique("spy"), _unique("victim")
    for device_id in (spy_id, victim_id):
        mosquitto.ca.issue_device_certificate(device_id)
    spy = device_session(mosquitto, spy_id)
    assert spy.connected.is_set(), spy.reason
    spy.client.subscribe([(f"iot/{victim_id}/#", 1), ("#", 1), (f"iot/{spy_id}/command/#", 1)])
    assert spy.subscribed.wait(5)
    # Mosquitto grants the SUBACK but filters delivery by the read ACL per message.
    victim = device_session(mosquitto, victim_id)
    victim.client.publish(f"iot/{victim_id}/telemetry", b"secret", qos=1).wait_for_publish(5)
    time.sleep(1.0)
    assert [m.payload for m in spy.messages] == []
    spy.close()
    victim.close()
