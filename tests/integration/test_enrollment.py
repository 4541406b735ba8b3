"""Enrollment and revocation against real PostgreSQL and a real CA: registry, audit, CRL, checks.

The launches through the Dagster webserver and the broker's enforcement are in
``test_enrollment_stack.py``; here the jobs run in process, so every rule is cheap to prove.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from cryptography import x509

from iot_platform.broker_control import INGEST_IDENTITY, read_denied_identities
from iot_platform.defs.pki import certificates as pki_assets
from iot_platform.defs.pki.enrollment import enroll_device, revoke_certificate
from iot_platform.defs.resources import BrokerControlResource, PKIResource
from iot_platform.pki import CertificateAuthority, init_pki
from iot_platform.warehouse.migrations import migrate
from tests.integration.test_pipeline import _warehouse
from tests.pki_helpers import make_csr, tamper_signature

pytestmark = pytest.mark.integration
PASSPHRASE = "enrollment test passphrase"


@pytest.fixture
def platform(tmp_path: Path, postgres_db: str):
    certs = tmp_path / "certs"
    init_pki(
        CertificateAuthority(certs, PASSPHRASE),
        broker_hosts=["127.0.0.1"],
        services=[INGEST_IDENTITY],
        crl_days=7,
    )
    with psycopg.connect(postgres_db) as conn:
        migrate(conn)
    acl = tmp_path / "acl"
    resources = {
        "warehouse": _warehouse(postgres_db),
        "pki": PKIResource(
            certs_dir=str(certs), ca_passphrase=PASSPHRASE, allow_server_keygen=True
        ),
        "broker": BrokerControlResource(acl_file=str(acl)),
    }
    return resources, certs, acl, postgres_db


def _enroll(resources: dict, **config) -> dg.ExecuteInProcessResult:
    return enroll_device.execute_in_process(
        run_config={"ops": {"issue_certificate": {"config": config}}},
        resources=resources,
        raise_on_error=False,
    )


def _revoke(resources: dict, **config) -> dg.ExecuteInProcessResult:
    return revoke_certificate.execute_in_process(
        run_config={"ops": {"revoke_certificates": {"config": config}}},
        resources=resources,
        raise_on_error=False,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    (event,) = [e for e in result.all_events if e.is_step_failure]
    return event.step_failure_data.error.message


def _snapshot(conninfo: str) -> tuple:
    with psycopg.connect(conninfo) as conn:
        return tuple(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("devices", "device_certificates", "certificate_audit")
        )


def test_enroll_from_csr_registers_certifies_and_audits(platform):
    resources, certs, _acl, conninfo = platform
    result = _enroll(
        resources,
        device_id="meter-csr-01",
        device_type="meter-dc",
        csr_pem=make_csr("meter-csr-01").decode(),
        validity_days=30,
        metadata={"site": "north"},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("issue_certificate")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert materialization.asset_key == dg.AssetKey(["pki", "device_certificates"])
    assert "private_key_file" not in meta and meta["method"] == "csr"
    cert = x509.load_pem_x509_certificate(Path(meta["certificate_pem"]).read_bytes())
    assert format(cert.serial_number, "x") == meta["serial_hex"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    assert not (certs / "devices" / "meter-csr-01.key").exists()  # the device keeps its key

    with psycopg.connect(conninfo) as conn:
        assert conn.execute(
            "SELECT device_type, metadata FROM devices WHERE device_id = 'meter-csr-01'"
        ).fetchone() == ("meter-dc", {"site": "north"})
        assert conn.execute(
            "SELECT serial_hex, fingerprint_sha256, revoked_at FROM device_certificates"
        ).fetchall() == [(meta["serial_hex"], meta["fingerprint_sha256"], None)]
        action, serial, actor, run_id = conn.execute(
            "SELECT action, serial_hex, actor, dagster_run_id FROM certificate_audit"
        ).fetchone()
    assert (action, serial, actor, run_id) == (
        "issue",
        meta["serial_hex"],
        "dagster-ui",
        result.run_id,
    )


def test_generated_key_is_written_0600_and_only_its_path_is_reported(platform):
    resources, certs, _acl, _conninfo = platform
    result = _enroll(resources, device_id="sensor-gen-01")
    assert result.success
    key_path = certs / "devices" / "sensor-gen-01.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key_text = key_path.read_text()
    (materialization,) = result.asset_materializations_for_node("issue_certificate")
    assert materialization.metadata["private_key_file"].value == str(key_path)
    events = json.dumps([str(e) for e in result.all_events])
    assert "PRIVATE KEY" not in events and key_text.splitlines()[1] not in events


def test_server_keygen_is_refused_unless_allowed(platform):
    resources, _certs, _acl, conninfo = platform
    pki = resources["pki"]
    strict = {**resources, "pki": PKIResource(certs_dir=pki.certs_dir, ca_passphrase=PASSPHRASE)}
    before = _snapshot(conninfo)
    assert "IOT_ALLOW_SERVER_KEYGEN" in _failure(_enroll(strict, device_id="no-csr-01"))
    assert _snapshot(conninfo) == before


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"device_id": "bad id!"}, "invalid device id"),
        ({"device_id": "x'; DROP TABLE devices;--"}, "invalid device id"),
        ({"device_id": "meter-02", "csr_pem": make_csr("meter-99").decode()}, "differs from"),
        (
            {"device_id": "meter-03", "csr_pem": tamper_signature(make_csr("meter-03")).decode()},
            "signature does not verify",
        ),
        ({"device_id": "meter-04", "csr_pem": "-----BEGIN GARBAGE-----"}, "not a valid PEM"),
        ({"device_id": "meter-05", "validity_days": 5000}, "after the CA expires"),
        ({"device_id": "meter-06", "validity_days": 0}, "must be 1-"),
        ({"device_id": "ingest"}, "platform service identity"),
        (
            {"device_id": "meter-07", "csr_pem": "-----BEGIN PRIVATE KEY-----\nMIG...\n"},
            "that is a private key, not a CSR",
        ),
    ],
)
def test_invalid_enrollment_fails_clearly_and_changes_nothing(platform, config, message):
    resources, certs, _acl, conninfo = platform
    before = _snapshot(conninfo)
    assert message in _failure(_enroll(resources, **config))
    assert _snapshot(conninfo) == before
    assert not any((certs / "devices").glob("*"))


def test_device_id_differing_only_in_case_is_refused_by_the_registry(platform):
    resources, certs, _acl, conninfo = platform
    assert _enroll(resources, device_id="acc-meter-01").success
    before = _snapshot(conninfo)
    message = _failure(_enroll(resources, device_id="ACC-METER-01"))
    assert "differs only in letter case from the enrolled device 'acc-meter-01'" in message
    assert _snapshot(conninfo) == before
    assert not (certs / "devices" / "ACC-METER-01.crt").exists()
    with psycopg.connect(conninfo) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO devices (device_id) VALUES ('Acc-Meter-01')")  # not only the job
    assert _enroll(resources, device_id="acc-meter-01").success  # renewal of the enrolled id


def test_reenrollment_keeps_or_supersedes_previous_certificates(platform):
    resources, _certs, _acl, conninfo = platform
    assert _enroll(resources, device_id="roll-01", device_type="meter-ac").success
    assert _enroll(resources, device_id="roll-01").success  # default: both stay valid
    with psycopg.connect(conninfo) as conn:  # a renewal without a type keeps the type
        assert conn.execute("SELECT device_type FROM devices").fetchone() == ("meter-ac",)
    with psycopg.connect(conninfo) as conn:
        first_two = conn.execute(
            "SELECT serial_hex FROM device_certificates WHERE revoked_at IS NULL"
        ).fetchall()
    assert len(first_two) == 2
    assert _enroll(resources, device_id="roll-01", revoke_previous=True).success
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT serial_hex, reason FROM device_certificates ORDER BY revoked_at NULLS LAST"
        ).fetchall()
    assert sorted(r[0] for r in rows if r[1] == "superseded") == sorted(s for (s,) in first_two)
    assert [r[1] for r in rows].count(None) == 1
    crl = CertificateAuthority(Path(resources["pki"].certs_dir), PASSPHRASE).load_crl()
    assert {format(e.serial_number, "x") for e in crl} == {s for (s,) in first_two}


def test_revoke_by_device_denies_the_identity_and_keeps_its_data(platform):
    resources, certs, acl, conninfo = platform
    for device in ("victim-01", "bystander-01"):
        assert _enroll(resources, device_id=device).success
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            "INSERT INTO telemetry (ts, device_id, metric, value, batch_id)"
            " VALUES (now(), 'victim-01', 'v', 1, 1)"
        )
        conn.commit()
    result = _revoke(resources, device_id="victim-01", reason="key_compromise")
    assert result.success
    assert read_denied_identities(certs) == ["victim-01"]
    assert "user victim-01\ntopic deny #" in acl.read_text()
    assert "bystander-01" not in acl.read_text()

    ca = CertificateAuthority(certs, PASSPHRASE)
    (entry,) = list(ca.load_crl())
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (2,)
        assert conn.execute(
            "SELECT action, device_id, detail->>'reason' FROM certificate_audit"
            " WHERE action = 'revoke'"
        ).fetchall() == [("revoke", "victim-01", "key_compromise")]

    # Revoking again, or an unknown serial, is a clear error that changes nothing.
    assert "no active certificate" in _failure(_revoke(resources, device_id="victim-01"))
    assert "not in the certificate registry" in _failure(_revoke(resources, serial="0xABC123"))
    assert "exactly one of" in _failure(_revoke(resources))

    # Re-enrolling the device lifts the broker deny (a new, valid certificate).
    assert _enroll(resources, device_id="victim-01").success
    assert read_denied_identities(certs) == []
    assert "topic deny" not in acl.read_text()


def test_the_crl_is_rebuilt_from_the_registry(platform):
    """A writer that re-signed a stale CRL (lost update) is repaired by the next refresh."""
    resources, certs, _acl, conninfo = platform
    assert _enroll(resources, device_id="stale-01").success
    assert _revoke(resources, device_id="stale-01", reason="key_compromise").success
    ca = CertificateAuthority(certs, PASSPHRASE)
    (ca.crl_path).unlink()
    ca.write_crl(days=7)  # a CRL without the revocation, as a racing writer could leave
    assert list(ca.load_crl()) == []
    assert dg.materialize([pki_assets.crl], resources=resources).success
    with psycopg.connect(conninfo) as conn:
        (serial,) = conn.execute("SELECT serial_hex FROM device_certificates").fetchone()
    assert [format(e.serial_number, "x") for e in ca.load_crl()] == [serial]


def test_revoke_by_serial_accepts_pasted_forms(platform):
    resources, _certs, _acl, conninfo = platform
    assert _enroll(resources, device_id="serial-01").success
    with psycopg.connect(conninfo) as conn:
        (serial,) = conn.execute("SELECT serial_hex FROM device_certificates").fetchone()
    pasted = "0x" + ":".join(serial.upper()[i : i + 2] for i in range(0, len(serial), 2))
    assert _revoke(resources, serial=pasted, reason="superseded").success
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT reason FROM device_certificates").fetchone() == ("superseded",)


def test_crl_check_fails_near_expiry_and_passes_after_the_refresh_job(platform):
    resources, certs, _acl, _conninfo = platform
    ca = CertificateAuthority(certs, PASSPHRASE)
    ca.write_crl(days=1 / 24)  # one hour left, inside the 48 h margin
    checks_only = dg.materialize(
        [pki_assets.crl, pki_assets.crl_not_expiring],
        selection=dg.AssetSelection.checks(pki_assets.crl_not_expiring),
        resources=resources,
    )
    (evaluation,) = checks_only.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["hours_remaining"].value <= 1

    defs = dg.Definitions(
        assets=[pki_assets.crl, pki_assets.device_certificates],
        asset_checks=[
            pki_assets.crl_not_expiring,
            pki_assets.certificates_expiring_soon,
            pki_assets.devices_without_valid_certificate,
        ],
        jobs=[pki_assets.crl_refresh_job],
        resources=resources,
    )
    refreshed = defs.resolve_job_def("crl_refresh_job").execute_in_process()
    evaluations = {e.check_name: e for e in refreshed.get_asset_check_evaluations()}
    assert evaluations["crl_not_expiring"].passed
    assert ca.load_crl().next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)


def test_inventory_checks_flag_expiring_and_uncertified_devices(platform):
    resources, _certs, _acl, conninfo = platform
    assert _enroll(resources, device_id="short-01", validity_days=10).success
    assert _enroll(resources, device_id="long-01", validity_days=300).success
    with psycopg.connect(conninfo) as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES ('never-enrolled-01')")
        conn.commit()
    result = dg.materialize(
        [
            pki_assets.device_certificates,
            pki_assets.certificates_expiring_soon,
            pki_assets.devices_without_valid_certificate,
        ],
        resources=resources,
    )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    expiring = evaluations["certificates_expiring_soon"]
    assert not expiring.passed and expiring.severity == dg.AssetCheckSeverity.WARN
    assert expiring.metadata["failing_device_ids"].value == ["short-01"]
    missing = evaluations["devices_without_valid_certificate"]
    assert missing.metadata["failing_device_ids"].value == ["never-enrolled-01"]
    (materialization,) = result.asset_materializations_for_node("pki__device_certificates")
    assert materialization.metadata["active"].value == 2


def test_secrets_stay_out_of_run_config_and_events(platform):
    resources, _certs, _acl, _conninfo = platform
    result = _enroll(resources, device_id="secret-01")
    run_config = json.dumps(result.dagster_run.run_config)
    events = json.dumps([str(e) for e in result.all_events])
    for text in (run_config, events):
        assert PASSPHRASE not in text and "PRIVATE KEY" not in text
