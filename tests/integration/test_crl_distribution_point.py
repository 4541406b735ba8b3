"""The CRL distribution point, served for real: what EMQX would fetch, fetched the same way.

A real CA whose certificates name a loopback URL, the real server (``crl_http``, and the
``iot-platform crl serve`` command), real revocations through ``write_crl`` (what the
revoke job and the CRL refresh schedule call):

* the URL a device certificate names answers with the DER CRL (``application/pkix-crl``),
  signed by the CA, scoped to that URL, listing the revoked serial and not the others;
* a second revocation is served at once, by the same server (no restart, no reload);
* a ``.pem`` URL gets the same CRL in PEM (what EMQX's cache refresh parses);
* if openssl is installed, ``openssl verify -crl_check -crl_download`` follows the
  certificate's distribution point to this server and refuses the revoked certificate
  while accepting a valid one — the check EMQX makes, by another client;
* the CLI command serves the same until SIGTERM, and exits 0 on it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from iot_platform.crl_http import serve_crl
from iot_platform.pki import CertificateAuthority, IssuedCertificate, init_pki

ROOT = Path(__file__).resolve().parents[2]
# -crl_download: fetch each CRL from the distribution point the certificate names.
OPENSSL_VERIFY = ["openssl", "verify", "-crl_check", "-crl_download"]


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[CertificateAuthority, str]]:
    """A CA whose certificates name the URL of a CRL server on an ephemeral loopback port."""
    certs = tmp_path / "certs"
    server = serve_crl(certs, "/crl.der", "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}/crl.der"
    ca = CertificateAuthority(certs, secrets.token_urlsafe(16), crl_url=url)
    init_pki(ca, broker_hosts=["localhost", "127.0.0.1"], services=["ingest"], crl_days=7)
    try:
        yield ca, url
    finally:
        server.shutdown()
        server.server_close()


def named_url(issued: IssuedCertificate) -> str:
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    ((name,),) = [point.full_name for point in cdp]
    return str(name.value)


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read()


def revoke(ca: CertificateAuthority, issued: IssuedCertificate) -> int:
    serial = int(issued.serial_hex, 16)
    ca.write_crl(revoke_serials={serial: x509.ReasonFlags.key_compromise})
    return serial


def fetch_crl(ca: CertificateAuthority, url: str) -> x509.CertificateRevocationList:
    content_type, body = fetch(url)
    assert content_type == "application/pkix-crl"
    crl = x509.load_der_x509_crl(body)
    ca_cert, _key = ca.load()
    assert crl.issuer == ca_cert.subject
    assert crl.is_signature_valid(ca_cert.public_key()), "not signed by the platform CA"
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert [n.value for n in idp.full_name] == [url], "scoped to the URL the certificates name"
    return crl


def revoked(crl: x509.CertificateRevocationList, serial: int) -> bool:
    return crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_the_url_in_the_certificate_serves_each_revocation_without_a_restart(served):
    ca, url = served
    first, second = (ca.issue_device_certificate(d) for d in ("meter-a", "meter-b"))
    assert named_url(first) == named_url(second) == url

    one = revoke(ca, first)
    crl = fetch_crl(ca, named_url(first))
    assert revoked(crl, one) and not revoked(crl, int(second.serial_hex, 16))

    two = revoke(ca, second)
    crl = fetch_crl(ca, named_url(second))  # the same server, the newest file
    assert revoked(crl, one) and revoked(crl, two)

    health = url.rsplit("/", 1)[0] + "/healthz"
    with urllib.request.urlopen(health, timeout=10) as response:
        assert response.status == 200


def test_a_pem_url_gets_the_same_crl_in_pem(served):
    ca, _url = served
    serial = revoke(ca, ca.issue_device_certificate("meter-pem"))
    server = serve_crl(ca.certs_dir, "/crl.pem", "127.0.0.1", 0)
    try:
        content_type, body = fetch(f"http://127.0.0.1:{server.server_address[1]}/crl.pem")
    finally:
        server.shutdown()
        server.server_close()
    assert content_type == "application/x-pem-file"
    assert body.startswith(b"-----BEGIN X509 CRL-----")
    assert revoked(x509.load_pem_x509_crl(body), serial)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_follows_the_distribution_point_and_refuses_the_revoked(served):
    ca, _url = served
    bad, good = (ca.issue_device_certificate(d) for d in ("meter-bad", "meter-good"))
    revoke(ca, bad)

    def verify(issued: IssuedCertificate) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OPENSSL_VERIFY, "-CAfile", str(ca.ca_cert_path), str(issued.cert_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    accepted = verify(good)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    refused = verify(bad)
    assert refused.returncode != 0 and "revoked" in (refused.stdout + refused.stderr)


def test_the_cli_serves_it_until_sigterm(served):
    ca, url = served
    serial = revoke(ca, ca.issue_device_certificate("meter-cli"))
    env = {
        **os.environ,
        "IOT_CERTS_DIR": str(ca.certs_dir),
        "IOT_HOME": str(ca.certs_dir.parent / "home"),
        "IOT_CRL_URL": url,
    }
    argv = [sys.executable, "-m", "iot_platform.cli", "crl", "serve", "--port", "0"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/crl.der ..."
        if not line:  # it exited: say why
            pytest.fail(f"crl serve exited {proc.wait()}: {proc.stderr and proc.stderr.read()}")
        served_at = next(w for w in line.split() if w.startswith("http://"))
        assert served_at.endswith("/crl.der"), line
        assert served_at != url, "--port 0 picks a free port, not the URL's"
        content_type, body = fetch(served_at)
        assert content_type == "application/pkix-crl"
        assert revoked(x509.load_der_x509_crl(body), serial)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
