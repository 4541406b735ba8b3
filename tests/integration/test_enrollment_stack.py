"""Enrollment and revocation on the embedded stack, launched through Dagster's GraphQL API.

This is what an operator does from the UI (and what `iot-platform devices` scripts): the
run goes through the webserver, the queued run coordinator and a run worker process,
and the broker started by `iot-platform up` enforces the result.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iot_platform.launcher import JobLauncher, RunOutcome
from iot_platform.pki import utcnow
from tests.fixtures.stack import Stack, make_stack_env, stack_ca, stack_secret, stack_warehouse
from tests.mqtt_helpers import Session, open_session
from tests.pki_helpers import make_csr, tamper_signature

pytestmark = [pytest.mark.integration, pytest.mark.long]


class Platform:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.ca = stack_ca(env)
        self.warehouse = stack_warehouse(env)
        self.launcher = JobLauncher(f"http://127.0.0.1:{env['IOT_DAGSTER_PORT']}", timeout_s=180)
        self.port = int(env["IOT_BROKER_PORT"])

    def enroll(self, **config) -> RunOutcome:
        return self.launcher.run(
            "enroll_device", {"ops": {"issue_certificate": {"config": config}}}
        )

    def connect(self, device_id: str, key_file: Path, client_id: str | None = None) -> Session:
        cert, _ = self.ca.device_paths(device_id)
        return open_session(
            "127.0.0.1",
            self.port,
            client_id=client_id or device_id,
            ca_file=self.ca.ca_cert_path,
            cert_file=cert,
            key_file=key_file,
        )

    def monitor(self) -> Session:
        """A reader with the ingest service identity, to see what the broker lets through."""
        cert, key = self.ca.service_paths("ingest")
        session = open_session(
            "127.0.0.1",
            self.port,
            client_id="enrollment-monitor",
            ca_file=self.ca.ca_cert_path,
            cert_file=cert,
            key_file=key,
        )
        session.client.subscribe("iot/#", qos=1)
        assert session.subscribed.wait(5)
        return session

    def counts(self) -> tuple:
        with psycopg.connect(self.warehouse) as conn:
            return conn.execute(
                "SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM device_certificates),"
                " (SELECT count(*) FROM certificate_audit)"
            ).fetchone()


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    home = Path(tempfile.mkdtemp(prefix="iot-enroll-"))
    env = make_stack_env(home)
    stack = Stack(env)
    stack.start()
    try:
        yield Platform(env)
    finally:
        assert stack.interrupt() == 0, "".join(stack.output)
        shutil.rmtree(home, ignore_errors=True)


def _device_key(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "device.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, path


def _wait_refused(platform: Platform, device_id: str, key_file: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        retry = platform.connect(device_id, key_file, client_id=f"{device_id}-retry")
        if not retry.connected.is_set():
            return
        retry.close()
        assert time.monotonic() < deadline, "revoked certificate still accepted"
        time.sleep(0.5)


def test_csr_enrollment_connects_publishes_only_as_itself_and_revocation_cuts_it_off(
    platform, tmp_path
):
    key, key_file = _device_key(tmp_path)
    csr = make_csr("meter-gql-01", key).decode()
    outcome = platform.enroll(device_id="meter-gql-01", device_type="meter-dc", csr_pem=csr)
    assert outcome.succeeded, outcome.errors

    monitor = platform.monitor()
    device = platform.connect("meter-gql-01", key_file)
    assert device.connected.is_set(), device.reason
    device.client.publish("iot/someone-else/telemetry", b"forged", qos=1)
    device.client.publish("iot/meter-gql-01/telemetry", b"own", qos=1).wait_for_publish(5)
    monitor.wait_for_messages(1)
    time.sleep(0.5)
    assert [(m.topic, m.payload) for m in monitor.messages] == [
        ("iot/meter-gql-01/telemetry", b"own")
    ]

    # Revoke while the device is connected: new handshakes are refused (CRL) and the
    # open session can no longer publish (ACL deny), both within seconds.
    before = platform.counts()
    revoked = _cli(platform, "revoke", "--device", "meter-gql-01", "--reason", "key_compromise")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked (key_compromise)" in revoked.stdout
    _wait_refused(platform, "meter-gql-01", key_file)
    device.client.publish("iot/meter-gql-01/telemetry", b"after-revocation", qos=1)
    time.sleep(2)
    assert [m.payload for m in monitor.messages] == [b"own"]
    device.close()
    monitor.close()
    devices, certificates, audit = platform.counts()
    assert (devices, certificates, audit) == (before[0], before[1], before[2] + 1)
    with psycopg.connect(platform.warehouse) as conn:
        assert conn.execute(
            "SELECT reason FROM device_certificates WHERE device_id = 'meter-gql-01'"
        ).fetchall() == [("key_compromise",)]


def _cli(
    platform: Platform, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iot_platform.cli", "devices", *args],
        env={**platform.env, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_cli_enrolls_with_a_generated_key_that_connects(platform):
    result = _cli(platform, "enroll", "sensor-cli-01", "--type", "sensor", "--meta", "site=lab")
    assert result.returncode == 0, result.stderr
    assert "enrolled sensor-cli-01: serial" in result.stdout
    # progress on stderr while it waits: the launch, then each status the run reaches
    assert "launched enroll_device: http" in result.stderr
    assert "enroll_device: SUCCESS after" in result.stderr
    cert, key = platform.ca.device_paths("sensor-cli-01")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    session = platform.connect("sensor-cli-01", key)
    assert session.connected.is_set(), session.reason
    session.close()

    listing = _cli(platform, "cert", "sensor-cli-01")
    assert listing.returncode == 0, listing.stderr
    assert "valid" in listing.stdout and cert.read_text() in listing.stdout
    everything = _cli(platform, "list")
    assert everything.returncode == 0, everything.stderr
    assert any(
        line.startswith("sensor-cli-01 ") and " valid " in line
        for line in everything.stdout.splitlines()
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"device_id": "bad id!"}, "invalid device id"),
        ({"device_id": "meter-gql-02", "csr_pem": make_csr("meter-gql-99").decode()}, "differs"),
        (
            {
                "device_id": "meter-gql-03",
                "csr_pem": tamper_signature(make_csr("meter-gql-03")).decode(),
            },
            "signature does not verify",
        ),
        ({"device_id": "meter-gql-04", "csr_pem": "garbage"}, "not a valid PEM"),
    ],
)
def test_invalid_launches_fail_clearly_and_change_nothing(platform, config, message):
    before = platform.counts()
    outcome = platform.enroll(**config)
    assert not outcome.succeeded
    assert any(message in error for error in outcome.errors), outcome.errors
    assert platform.counts() == before


def test_crl_refresh_job_renews_a_crl_near_expiry(platform):
    platform.ca.write_crl(days=1 / 24)
    outcome = platform.launcher.run("crl_refresh_job", {})
    assert outcome.succeeded, outcome.errors
    remaining = platform.ca.load_crl().next_update_utc - utcnow()
    assert remaining.days >= 6


def test_cli_from_another_folder_reports_what_the_run_did(platform, tmp_path):
    """A succeeded job is never reported as failed: the CLI prints what the run issued and
    where it wrote it, even when it cannot read the registry itself (a wrong IOT_PG_PORT
    here); `devices cert` refuses to leave the PEM out silently."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = platform.counts()
    result = _cli(platform, "enroll", "cwd-cli-01", cwd=elsewhere, IOT_PG_PORT="1")
    assert result.returncode == 0, result.stderr
    assert platform.counts()[1] == before[1] + 1  # exactly one certificate, reported
    cert, key = platform.ca.device_paths("cwd-cli-01")
    with psycopg.connect(platform.warehouse) as conn:
        serial = conn.execute(
            "SELECT serial_hex FROM device_certificates WHERE device_id = 'cwd-cli-01'"
        ).fetchone()[0]
    assert f"enrolled cwd-cli-01: serial {serial}," in result.stdout
    assert f"certificate {cert}, private key {key}" in result.stdout
    assert list(elsewhere.iterdir()) == []  # nothing written to the current folder

    shown = _cli(platform, "cert", "cwd-cli-01", cwd=elsewhere)
    assert shown.returncode == 0, shown.stderr
    assert cert.read_text() in shown.stdout
    empty = tmp_path / "no-certs"
    missing = _cli(platform, "cert", "cwd-cli-01", cwd=elsewhere, IOT_CERTS_DIR=str(empty))
    assert missing.returncode == 1
    assert f"the certificate file {empty}/devices/" in missing.stderr
    assert "IOT_CERTS_DIR" in missing.stderr

    # RFC 5280's own spelling of the reason
    revoked = _cli(platform, "revoke", "--device", "cwd-cli-01", "--reason", "keyCompromise")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked (key_compromise)" in revoked.stdout


def test_a_failed_run_reports_the_underlying_error(platform):
    """Not a PKIError: the step fails with DagsterExecutionStepExecutionError, whose own
    message names only the op; the operator must see the exception that caused it."""
    before = platform.counts()
    outcome = platform.enroll(device_id="nul-type-01", device_type="meter\x00dc")
    assert not outcome.succeeded
    assert any("Error occurred while executing op" in e and "NUL" in e for e in outcome.errors), (
        outcome.errors
    )
    assert platform.counts() == before


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_enrollment_steps_run_as_written(platform, tmp_path):
    """The README's CSR, enroll, publish and revoke steps, with only this stack's port,
    certificate directory and interpreter put in: no key lands where they are run, and the
    broker's answer to the publish is visible although mosquitto_pub exits 0 either way."""
    text = README.read_text()
    script = text[text.index("# a device keeps its key") : text.index('rm -r "$dev"\n') + 12]
    script = (
        script.replace(".venv/bin/iot-platform", f"{sys.executable} -m iot_platform.cli")
        .replace("-p 8883", f"-p {platform.port}")
        .replace("certs/", f"{platform.env['IOT_CERTS_DIR']}/")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=platform.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "received PUBACK (Mid: 1, RC:0)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the key went to a temp dir, now removed
    with psycopg.connect(platform.warehouse) as conn:
        assert conn.execute(
            "SELECT reason FROM device_certificates WHERE device_id = 'meter-01'"
        ).fetchall() == [("key_compromise",)]


def test_no_private_key_or_ca_passphrase_in_logs_or_events(platform):
    """After the enrollments above: grep the stack's logs and Dagster's event log."""
    key_bodies = [
        path.read_text().splitlines()[1]
        for path in Path(platform.env["IOT_CERTS_DIR"]).rglob("*.key")
    ]
    secrets_to_hide = [stack_secret(platform.env, "ca_passphrase"), "PRIVATE KEY", *key_bodies]
    logs = "".join(
        path.read_text(errors="replace")
        for path in Path(platform.env["IOT_HOME"]).rglob("*")
        if path.is_file() and path.suffix in {".log", ".out", ".err", ".complete"}
    )
    with psycopg.connect(stack_warehouse(platform.env, "dagster")) as conn:
        events = "\n".join(row[0] for row in conn.execute("SELECT event FROM event_logs"))
        run_configs = "\n".join(row[0] for row in conn.execute("SELECT run_body FROM runs"))
    assert "issued certificate" in events  # the enrollments above are really in there
    for text in (logs, events, run_configs):
        leaked = [s[:12] for s in secrets_to_hide if s in text]
        assert leaked == [], f"secret material found: {leaked}"
