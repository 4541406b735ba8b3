"""PKI library: CA at rest, idempotent init, CSR validation, CRL ledger."""

from __future__ import annotations

import secrets
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from iot_platform.pki import CertificateAuthority, PKIError, init_pki
from tests.pki_helpers import make_csr, tamper_signature


@pytest.fixture
def authority(tmp_path) -> CertificateAuthority:
    ca = CertificateAuthority(tmp_path / "certs", "correct horse battery staple")
    init_pki(
        ca, broker_hosts=["localhost", "127.0.0.1", "mosquitto"], services=["ingest"], crl_days=7
    )
    return ca


def test_ca_key_is_encrypted_and_needs_the_passphrase(authority):
    pem = authority.ca_key_path.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, password=None)
    with pytest.raises(PKIError, match="wrong CA passphrase"):
        CertificateAuthority(authority.certs_dir, "not the passphrase").load()
    assert stat.S_IMODE(authority.ca_key_path.stat().st_mode) == 0o600


def test_init_is_idempotent_and_never_overwrites_the_ca(authority):
    ca_before = authority.ca_cert_path.read_bytes()
    broker_before = (authority.certs_dir / "broker.crt").read_bytes()
    created = init_pki(authority, broker_hosts=["localhost"], services=["ingest"], crl_days=7)
    assert created == []
    assert authority.ca_cert_path.read_bytes() == ca_before
    assert (authority.certs_dir / "broker.crt").read_bytes() == broker_before
    with pytest.raises(PKIError, match="wrong CA passphrase"):
        init_pki(
            CertificateAuthority(authority.certs_dir, "other"),
            broker_hosts=["x"],
            services=[],
            crl_days=7,
        )
    assert authority.ca_cert_path.read_bytes() == ca_before


def test_broker_certificate_has_the_sans(authority):
    cert = x509.load_pem_x509_certificate((authority.certs_dir / "broker.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "mosquitto"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_device_certificate_from_csr_keeps_the_key_on_the_device(authority):
    issued = authority.sign_device_csr("meter-01", make_csr("meter-01"))
    assert issued.key_path is None
    assert not authority.device_paths("meter-01")[1].exists()
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-01"
    assert format(cert.serial_number, "x") == issued.serial_hex


def test_generated_device_key_is_private(authority):
    issued = authority.issue_device_certificate("dev-key")
    assert issued.key_path is not None
    assert stat.S_IMODE(issued.key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("device_id", "csr", "message"),
    [
        ("meter-01", b"garbage", "not a valid PEM"),
        ("meter-01", None, "differs from the device id"),
        ("../etc", None, "invalid device id"),
        ("a/b/#", None, "invalid device id"),
    ],
)
def test_bad_csr_is_rejected_with_a_clear_message(authority, device_id, csr, message):
    with pytest.raises(PKIError, match=message):
        authority.sign_device_csr(device_id, csr if csr is not None else make_csr("someone-else"))


def test_weak_rsa_key_is_rejected(authority):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(PKIError, match="too weak"):
        authority.sign_device_csr("weak-01", make_csr("weak-01", weak))


def test_tampered_csr_signature_is_rejected(authority):
    tampered = tamper_signature(make_csr("meter-02"))
    with pytest.raises(PKIError, match="signature does not verify"):
        authority.sign_device_csr("meter-02", tampered)


def test_validity_beyond_the_ca_is_rejected(authority):
    with pytest.raises(PKIError, match="after the CA expires"):
        authority.issue_device_certificate("long-lived", days=100_000)


def test_crl_accumulates_revocations_and_refreshes_next_update(authority):
    first = authority.issue_device_certificate("r1")
    second = authority.issue_device_certificate("r2")
    authority.write_crl(revoke_serials={int(first.serial_hex, 16): x509.ReasonFlags.superseded})
    crl = authority.write_crl(
        revoke_serials={int(second.serial_hex, 16): x509.ReasonFlags.key_compromise}, days=2
    )
    assert {e.serial_number for e in crl} == {int(first.serial_hex, 16), int(second.serial_hex, 16)}
    ca_cert, _ = authority.load()
    assert crl.is_signature_valid(ca_cert.public_key())
    assert crl.next_update_utc > crl.last_update_utc
    refreshed = authority.write_crl(days=30)
    assert len(list(refreshed)) == 2
    assert refreshed.next_update_utc > crl.next_update_utc


def test_empty_passphrase_is_refused(tmp_path):
    with pytest.raises(PKIError, match="passphrase is empty"):
        CertificateAuthority(tmp_path, "")


def test_secret_does_not_print(monkeypatch, tmp_path):
    from iot_platform.settings import env_secret

    secret_file = tmp_path / "pw"
    value = secrets.token_urlsafe(12)
    secret_file.write_text(value + "\n")
    monkeypatch.delenv("IOT_X", raising=False)
    monkeypatch.setenv("IOT_X_FILE", str(secret_file))
    secret = env_secret("IOT_X")
    assert secret is not None and secret.value == value
    assert value not in repr(secret) and value not in str(secret)
