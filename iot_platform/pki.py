"""Platform PKI with `cryptography` only: CA, broker/service/device certificates, CRL.

Layout of the certs directory (keys are mode 0600, the CA key is encrypted at rest):

    ca.crt  ca.key  crl.pem  [crl.der]  broker.crt  broker.key
    services/{name}.crt|.key     devices/{device_id}.crt[|.key]

The CRL file is the ledger of revocations: revoking re-signs the existing entries plus
the new one, and refreshing re-signs the same entries with a new nextUpdate.

With a CRL distribution point (``IOT_CRL_URL``), every leaf certificate names it and
each re-signing also writes ``crl.der``: the same entries, DER, with an Issuing
Distribution Point naming that URL — what ``iot-platform crl serve`` answers at the URL
and EMQX fetches (it enforces a CRL only with that extension). ``crl.pem`` stays without
it: OpenSSL (Mosquitto's ``crlfile``) refuses a CRL whose distribution point a
certificate does not name ("different CRL scope"), which would lock out every
certificate issued before the URL was set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iot_platform.device_ids import DEVICE_ID_PATTERN
from iot_platform.files import atomic_write

CA_COMMON_NAME = "IoT Platform CA"
MIN_RSA_BITS = 2048
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
CRL_PEM = "crl.pem"  # the broker's crlfile: every revocation, no distribution point
CRL_DER = "crl.der"  # the same entries for IOT_CRL_URL, with its Issuing Distribution Point


class PKIError(Exception):
    """A PKI operation failed; the message is safe to show to an operator."""


@dataclass(frozen=True)
class IssuedCertificate:
    """What an operator needs to know about a certificate; never holds a private key."""

    common_name: str
    serial_hex: str
    fingerprint_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    cert_path: Path
    key_path: Path | None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validate_device_id(device_id: str) -> str:
    """Device ids become MQTT topic levels and ACL usernames: keep them to a safe alphabet."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise PKIError(
            f"invalid device id {device_id!r}: use 1-64 characters from A-Z a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return device_id


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _write_private(path: Path, data: bytes) -> None:
    """Write key material atomically, created with mode 0600 (never world-readable)."""
    atomic_write(path, data, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """Replace a world-readable file atomically: a reader (the broker) sees old or new."""
    atomic_write(path, data, mode=0o644)


def device_paths(certs_dir: Path, device_id: str) -> tuple[Path, Path]:
    """(certificate, key) of a device in the certs directory; the key exists only if generated."""
    devices = certs_dir / "devices"
    return devices / f"{device_id}.crt", devices / f"{device_id}.key"


def dp_crl_path(certs_dir: Path) -> Path:
    """The CRL served at IOT_CRL_URL (``crl.der``); written only while the URL is set."""
    return certs_dir / CRL_DER


def _uri(url: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(url)]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_public_key_strength(public_key: object) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise PKIError(
                f"RSA key of {public_key.key_size} bits is too weak (min {MIN_RSA_BITS})"
            )
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ACCEPTED_CURVES):
            raise PKIError(f"elliptic curve {public_key.curve.name} is not accepted")
        return
    raise PKIError(f"unsupported key type {type(public_key).__name__}: use EC P-256 or RSA")


class CertificateAuthority:
    """The platform CA rooted in ``certs_dir``; the key is loaded with the passphrase.

    ``crl_url`` (``IOT_CRL_URL``, "" for none) is the CRL distribution point every leaf
    certificate it signs carries, and the one the served ``crl.der`` is scoped to.
    """

    def __init__(self, certs_dir: Path, passphrase: str, *, crl_url: str = "") -> None:
        if not passphrase:
            raise PKIError("the CA passphrase is empty: set IOT_CA_PASSPHRASE or _FILE")
        self.certs_dir = Path(certs_dir)
        self._passphrase = passphrase.encode()
        self.crl_url = crl_url

    # ---- paths -------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.certs_dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.certs_dir / CRL_PEM

    @property
    def dp_crl_path(self) -> Path:
        return dp_crl_path(self.certs_dir)

    def service_paths(self, name: str) -> tuple[Path, Path]:
        return (
            self.certs_dir / "services" / f"{name}.crt",
            self.certs_dir / "services" / f"{name}.key",
        )

    def device_paths(self, device_id: str) -> tuple[Path, Path]:
        return device_paths(self.certs_dir, device_id)

    # ---- CA ----------------------------------------------------------------
    def exists(self) -> bool:
        return self.ca_cert_path.exists() and self.ca_key_path.exists()

    def create(self, *, days: int = 3650) -> bool:
        """Create the CA unless one exists; returns True if it was created. Never overwrites."""
        if self.ca_cert_path.exists() or self.ca_key_path.exists():
            if not self.exists():
                raise PKIError(f"incomplete CA in {self.certs_dir}: ca.crt/ca.key half present")
            self.load()  # proves the passphrase matches
            return False
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        now = utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA384())
        )
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )
        _write_private(self.ca_key_path, encrypted)
        write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key_bytes = self.ca_key_path.read_bytes()
        except FileNotFoundError:
            raise PKIError(f"no CA in {self.certs_dir}: run `iot-platform pki init`") from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=self._passphrase)
        except (ValueError, TypeError):
            raise PKIError("cannot decrypt the CA key: wrong CA passphrase") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError("the CA key is not an EC key")
        return cert, key

    # ---- leaf certificates -------------------------------------------------
    def _sign_leaf(
        self,
        *,
        common_name: str,
        public_key: object,
        server_hosts: list[str] | None,
        days: int,
        not_before: dt.datetime | None,
    ) -> x509.Certificate:
        ca_cert, ca_key = self.load()
        start = not_before or (utcnow() - dt.timedelta(minutes=5))
        end = start + dt.timedelta(days=days)
        if end > ca_cert.not_valid_after_utc:
            raise PKIError(
                f"validity of {days} days ends after the CA expires "
                f"({ca_cert.not_valid_after_utc:%Y-%m-%d})"
            )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server_hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(host) for host in server_hosts]), critical=False
            )
        if self.crl_url:
            # Where a relying party (EMQX) fetches the CRL that can revoke this certificate.
            point = x509.DistributionPoint(
                full_name=_uri(self.crl_url), relative_name=None, reasons=None, crl_issuer=None
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _issue_with_new_key(
        self,
        common_name: str,
        cert_path: Path,
        key_path: Path,
        *,
        server_hosts: list[str] | None = None,
        days: int,
        not_before: dt.datetime | None = None,
    ) -> IssuedCertificate:
        key = _new_key()
        cert = self._sign_leaf(
            common_name=common_name,
            public_key=key.public_key(),
            server_hosts=server_hosts,
            days=days,
            not_before=not_before,
        )
        _write_private(key_path, _key_pem(key))
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return _describe(cert, cert_path, key_path)

    def issue_broker_certificate(self, hosts: list[str], *, days: int = 825) -> IssuedCertificate:
        return self._issue_with_new_key(
            hosts[0],
            self.certs_dir / "broker.crt",
            self.certs_dir / "broker.key",
            server_hosts=hosts,
            days=days,
        )

    def issue_service_certificate(self, name: str, *, days: int = 825) -> IssuedCertificate:
        cert_path, key_path = self.service_paths(validate_device_id(name))
        return self._issue_with_new_key(name, cert_path, key_path, days=days)

    def issue_device_certificate(
        self, device_id: str, *, days: int = 365, not_before: dt.datetime | None = None
    ) -> IssuedCertificate:
        """Development path: the platform generates the device key (mode 0600 in certs/devices)."""
        cert_path, key_path = self.device_paths(validate_device_id(device_id))
        return self._issue_with_new_key(
            device_id, cert_path, key_path, days=days, not_before=not_before
        )

    def sign_device_csr(
        self, device_id: str, csr_pem: str | bytes, *, days: int = 365
    ) -> IssuedCertificate:
        """Production path: the device keeps its key and sends a CSR whose CN is its id."""
        validate_device_id(device_id)
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError:
            raise PKIError("the CSR is not a valid PEM certificate signing request") from None
        try:
            valid_signature = csr.is_signature_valid
        except (ValueError, InvalidSignature):
            valid_signature = False
        if not valid_signature:
            raise PKIError("the CSR signature does not verify: it was altered or not self-signed")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        if cn != device_id:
            raise PKIError(f"the CSR common name {cn!r} differs from the device id {device_id!r}")
        public_key = csr.public_key()
        _check_public_key_strength(public_key)
        cert = self._sign_leaf(
            common_name=device_id,
            public_key=public_key,
            server_hosts=None,
            days=days,
            not_before=None,
        )
        cert_path, _ = self.device_paths(device_id)
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return _describe(cert, cert_path, None)

    # ---- revocation --------------------------------------------------------
    def load_crl(self) -> x509.CertificateRevocationList | None:
        if not self.crl_path.exists():
            return None
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    def write_crl(
        self,
        *,
        revoke_serials: dict[int, x509.ReasonFlags] | None = None,
        days: float = 7,
    ) -> x509.CertificateRevocationList:
        """Re-sign the CRL: existing entries plus ``revoke_serials``, nextUpdate = now + days.

        Writes ``crl.pem`` and, with a ``crl_url``, ``crl.der`` (the same entries scoped to
        that distribution point); without one a ``crl.der`` left from before is removed, so
        the distribution point fails closed rather than serving a CRL that stops changing.
        """
        ca_cert, ca_key = self.load()
        now = utcnow()
        entries: list[x509.RevokedCertificate] = []
        already: set[int] = set()
        existing = self.load_crl()
        if existing is not None:
            for entry in existing:
                entries.append(entry)
                already.add(entry.serial_number)
        for serial, reason in (revoke_serials or {}).items():
            if serial in already:
                continue
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )

        def sign(scope: str) -> x509.CertificateRevocationList:
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca_cert.subject)
                .last_update(now - dt.timedelta(minutes=5))
                .next_update(now + dt.timedelta(days=days))
            )
            for entry in entries:
                builder = builder.add_revoked_certificate(entry)
            if scope:  # RFC 5280 §5.2.5: the extension MUST be critical
                idp = x509.IssuingDistributionPoint(
                    full_name=_uri(scope),
                    relative_name=None,
                    only_contains_user_certs=False,
                    only_contains_ca_certs=False,
                    only_some_reasons=None,
                    indirect_crl=False,
                    only_contains_attribute_certs=False,
                )
                builder = builder.add_extension(idp, critical=True)
            return builder.sign(ca_key, hashes.SHA384())

        crl = sign("")
        if self.crl_url:
            dp_crl = sign(self.crl_url)
            write_public(self.dp_crl_path, dp_crl.public_bytes(serialization.Encoding.DER))
        else:
            self.dp_crl_path.unlink(missing_ok=True)
        # The ledger last: a failure above leaves it as it was, and re-signing repeats both.
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return crl


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _describe(cert: x509.Certificate, cert_path: Path, key_path: Path | None) -> IssuedCertificate:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return IssuedCertificate(
        common_name=str(cn),
        serial_hex=format(cert.serial_number, "x"),
        fingerprint_sha256=fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        cert_path=cert_path,
        key_path=key_path,
    )


def init_pki(
    ca: CertificateAuthority, *, broker_hosts: list[str], services: list[str], crl_days: float
) -> list[str]:
    """Create whatever is missing (CA, broker and service certificates, CRL); return what was made.

    Idempotent: an existing CA is kept (and its passphrase checked), existing leaf
    certificates are kept, and the CRL is re-signed so its nextUpdate is fresh.
    """
    created: list[str] = []
    if ca.create():
        created.append("ca")
    if not (ca.certs_dir / "broker.crt").exists():
        ca.issue_broker_certificate(broker_hosts)
        created.append("broker")
    for name in services:
        if not ca.service_paths(name)[0].exists():
            ca.issue_service_certificate(name)
            created.append(f"service:{name}")
    ca.write_crl(days=crl_days)
    return created
