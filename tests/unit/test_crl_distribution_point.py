"""IOT_CRL_URL: the CRL distribution point every issued certificate names, and the CRLs.

What is checked, and why it can fail:

* with the setting, every leaf the CA signs — device (platform key and CSR), service and
  broker — names exactly that URL and nothing else; without it, none names any;
* each re-signing writes ``crl.der`` (the same entries, an Issuing Distribution Point with
  that URL, critical: EMQX enforces only such a CRL) and keeps ``crl.pem`` without one; with
  the setting gone, ``crl.der`` goes too (the distribution point fails closed);
* ``crl.pem`` still accepts a certificate issued before the URL was set, as Mosquitto's
  OpenSSL reads it (an IDP there would be "different CRL scope" for such a certificate);
* the setting refuses what is not an http(s) URL, by name.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cryptography import x509

from iot_platform.pki import CertificateAuthority, dp_crl_path, init_pki
from iot_platform.settings import PlatformSettings, SettingsError
from tests.pki_helpers import make_csr

URL = "http://crl.example.internal:8088/crl.der"
PASSPHRASE = "correct horse battery staple"


def make_ca(certs, crl_url: str = "") -> CertificateAuthority:
    ca = CertificateAuthority(certs, PASSPHRASE, crl_url=crl_url)
    init_pki(ca, broker_hosts=["localhost", "127.0.0.1"], services=["ingest"], crl_days=7)
    return ca


def distribution_points(path) -> list[list[str]] | None:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return None
    assert not ext.critical
    return [[name.value for name in point.full_name or []] for point in ext.value]


def leaf_paths(ca: CertificateAuthority) -> list:
    keygen = ca.issue_device_certificate("meter-keygen").cert_path
    csr = ca.sign_device_csr("meter-csr", make_csr("meter-csr")).cert_path
    return [keygen, csr, ca.service_paths("ingest")[0], ca.certs_dir / "broker.crt"]


def test_every_certificate_names_exactly_the_configured_url(tmp_path):
    ca = make_ca(tmp_path / "certs", URL)
    for path in leaf_paths(ca):
        assert distribution_points(path) == [[URL]], path.name
    assert distribution_points(ca.ca_cert_path) is None, "the CA itself is not revoked by it"


def test_without_the_setting_no_certificate_names_one(tmp_path):
    ca = make_ca(tmp_path / "certs")
    for path in leaf_paths(ca):
        assert distribution_points(path) is None, path.name
    assert not dp_crl_path(ca.certs_dir).exists()


def test_the_served_crl_is_scoped_to_the_url_and_the_broker_crl_is_not(tmp_path):
    ca = make_ca(tmp_path / "certs", URL)
    device = ca.issue_device_certificate("meter-1")
    ca.write_crl(revoke_serials={int(device.serial_hex, 16): x509.ReasonFlags.key_compromise})
    served = x509.load_der_x509_crl(dp_crl_path(ca.certs_dir).read_bytes())
    idp = served.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical, "RFC 5280 §5.2.5: the IDP extension is critical"
    assert [name.value for name in idp.value.full_name] == [URL]
    broker_crl = ca.load_crl()
    assert broker_crl is not None
    with pytest.raises(x509.ExtensionNotFound):
        broker_crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    serial = int(device.serial_hex, 16)
    for crl in (served, broker_crl):
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert crl.is_signature_valid(ca.load()[0].public_key())
    # The setting gone: the served CRL goes with it rather than going stale.
    make_ca(ca.certs_dir).write_crl()
    assert not dp_crl_path(ca.certs_dir).exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mosquittos_crl_still_accepts_certificates_issued_before_the_url(tmp_path):
    before = make_ca(tmp_path / "certs")
    old = before.issue_device_certificate("meter-old").cert_path
    after = CertificateAuthority(before.certs_dir, PASSPHRASE, crl_url=URL)
    new = after.issue_device_certificate("meter-new").cert_path
    after.write_crl()
    for cert in (old, new):
        verify = ["openssl", "verify", "-crl_check", "-CAfile", str(after.ca_cert_path)]
        result = subprocess.run(
            [*verify, "-CRLfile", str(after.crl_path), str(cert)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_setting_is_validated(monkeypatch):
    monkeypatch.delenv("IOT_CRL_URL", raising=False)
    assert PlatformSettings.from_env().crl_url == ""
    monkeypatch.setenv("IOT_CRL_URL", URL)
    assert PlatformSettings.from_env().crl_url == URL
    for bad in ("ftp://host/crl.der", "crl.der", "http:///crl.der", "http://u:p@host/crl"):
        monkeypatch.setenv("IOT_CRL_URL", bad)
        with pytest.raises(SettingsError, match="IOT_CRL_URL"):
            PlatformSettings.from_env()
