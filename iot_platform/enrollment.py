"""Device enrollment and certificate revocation against the registry, in one transaction each.

The Dagster jobs (``iot_platform.defs.pki.enrollment``) are thin wrappers around these
functions, so the Launchpad, the GraphQL API and the operator CLI share one code path.

Re-enrollment policy: enrolling an enrolled device issues a new certificate and keeps
the previous ones valid until they expire, so a device can roll its key without a gap;
``revoke_previous`` revokes them (reason ``superseded``) in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass, field

import psycopg
from cryptography import x509
from psycopg import errors

from iot_platform.broker_control import INGEST_IDENTITY
from iot_platform.pki import CertificateAuthority, IssuedCertificate, PKIError, validate_device_id

MAX_METADATA_BYTES = 4096
DEVICE_TYPE_MAX_LEN = 64
MAX_VALIDITY_DAYS = 36_500  # the CA's own validity is checked when signing
# Service identities have broker privileges (the ingest user reads every topic): a device
# certificate with such a CN would inherit them, and revoking it would lock the service out.
RESERVED_IDENTITIES = frozenset({INGEST_IDENTITY})
# The registry's unique index on lower(device_id) (warehouse migration 3).
CASE_INSENSITIVE_ID_INDEX = "devices_device_id_lower"
# Serialises CRL writers (revocations, refreshes) across processes.
CRL_LOCK = 0x1_0C_A1


class EnrollmentError(PKIError):
    """The request cannot be honoured; the message tells the operator why. Nothing changed."""


class RevocationReason(enum.Enum):
    """RFC 5280 CRLReason codes an operator may choose (``removeFromCRL`` is not a revocation)."""

    unspecified = "unspecified"
    key_compromise = "key_compromise"
    ca_compromise = "ca_compromise"
    affiliation_changed = "affiliation_changed"
    superseded = "superseded"
    cessation_of_operation = "cessation_of_operation"
    certificate_hold = "certificate_hold"
    privilege_withdrawn = "privilege_withdrawn"
    aa_compromise = "aa_compromise"

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags[self.value]

    @classmethod
    def _missing_(cls, value: object) -> RevocationReason | None:
        """RFC 5280's own spellings too (``keyCompromise``, ``cACompromise``), any case."""
        wanted = str(value).replace("_", "").lower()
        return next((m for m in cls if m.value.replace("_", "") == wanted), None)


def refuse_private_key(csr_pem: str) -> None:
    """A key pasted where the CSR goes must fail loudly (and, from the CLI, before launch)."""
    if "PRIVATE KEY" in csr_pem:
        raise EnrollmentError(
            "that is a private key, not a CSR: keep it on the device and send its CSR"
        )


@dataclass(frozen=True)
class EnrollmentRequest:
    device_id: str
    device_type: str | None = None  # None: keep the registered type ('generic' when new)
    csr_pem: str = ""
    validity_days: int = 365
    metadata: dict[str, str] = field(default_factory=dict)
    revoke_previous: bool = False

    def validate(self, *, allow_server_keygen: bool) -> None:
        validate_device_id(self.device_id)
        if self.device_id in RESERVED_IDENTITIES:
            raise EnrollmentError(
                f"{self.device_id!r} is a platform service identity, not a device"
            )
        if self.device_type is not None and not 1 <= len(self.device_type) <= DEVICE_TYPE_MAX_LEN:
            raise EnrollmentError(f"device type must be 1-{DEVICE_TYPE_MAX_LEN} characters")
        if not 1 <= self.validity_days <= MAX_VALIDITY_DAYS:
            raise EnrollmentError(
                f"validity of {self.validity_days} days: must be 1-{MAX_VALIDITY_DAYS}"
            )
        refuse_private_key(self.csr_pem)
        if len(json.dumps(self.metadata)) > MAX_METADATA_BYTES:
            raise EnrollmentError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        if not self.csr_pem.strip() and not allow_server_keygen:
            raise EnrollmentError(
                "no CSR given and server-side key generation is off: generate the key on the "
                "device and pass its CSR (PEM), or set IOT_ALLOW_SERVER_KEYGEN=true (development)"
            )


@dataclass(frozen=True)
class Actor:
    """Who asked: recorded in ``certificate_audit`` with the Dagster run that did it."""

    name: str
    run_id: str | None


@dataclass(frozen=True)
class Enrollment:
    certificate: IssuedCertificate
    superseded: list[str]


@dataclass(frozen=True)
class Revocation:
    serial_hex: str
    device_id: str


def normalise_serial(serial: str) -> str:
    """Accept the forms operators paste (``0x1A2B``, ``1a:2b``) and return the stored hex."""
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return format(int(text, 16), "x")
    except ValueError:
        raise EnrollmentError(f"serial {serial!r} is not a hexadecimal number") from None


def enroll(
    conn: psycopg.Connection,
    ca: CertificateAuthority,
    request: EnrollmentRequest,
    actor: Actor,
    *,
    allow_server_keygen: bool,
    crl_days: float,
) -> Enrollment:
    """Register (or update) the device and issue its certificate, recorded and audited.

    One transaction: an invalid request (checked before any file is written: the CSR is
    parsed and verified before the certificate is signed) rolls the registry back. Only
    a failure after signing (the commit itself) can leave a signed certificate file that
    the registry does not list.
    """
    request.validate(allow_server_keygen=allow_server_keygen)
    try:
        return _enroll(conn, ca, request, actor, crl_days=crl_days)
    except errors.UniqueViolation as exc:
        if exc.diag.constraint_name != CASE_INSENSITIVE_ID_INDEX:
            raise
        row = conn.execute(
            "SELECT device_id FROM devices WHERE lower(device_id) = lower(%s)", [request.device_id]
        ).fetchone()
        enrolled = row[0] if row else "another device"
        raise EnrollmentError(
            f"device id {request.device_id!r} differs only in letter case from the enrolled "
            f"device {enrolled!r}: device ids are unique ignoring case (re-enroll "
            f"{enrolled!r} to renew its certificate)"
        ) from None


def _enroll(
    conn: psycopg.Connection,
    ca: CertificateAuthority,
    request: EnrollmentRequest,
    actor: Actor,
    *,
    crl_days: float,
) -> Enrollment:
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO devices (device_id, device_type, metadata)
            VALUES (%(id)s, coalesce(%(type)s, 'generic'), %(meta)s::jsonb)
            ON CONFLICT (device_id) DO UPDATE
               SET device_type = coalesce(%(type)s, devices.device_type),
                   metadata = devices.metadata || EXCLUDED.metadata,
                   updated_at = now()
            """,
            {
                "id": request.device_id,
                "type": request.device_type,
                "meta": json.dumps(request.metadata),
            },
        )
        if request.csr_pem.strip():
            issued = ca.sign_device_csr(
                request.device_id, request.csr_pem, days=request.validity_days
            )
        else:
            issued = ca.issue_device_certificate(request.device_id, days=request.validity_days)
        conn.execute(
            """
            INSERT INTO device_certificates
                (serial_hex, device_id, fingerprint_sha256, not_before, not_after)
            VALUES (%s, %s, %s, %s, %s)
            """,
            [
                issued.serial_hex,
                request.device_id,
                issued.fingerprint_sha256,
                issued.not_before,
                issued.not_after,
            ],
        )
        _audit(
            conn,
            "issue",
            issued.serial_hex,
            request.device_id,
            actor,
            {
                "method": "csr" if request.csr_pem.strip() else "server_keygen",
                "fingerprint_sha256": issued.fingerprint_sha256,
                "not_after": issued.not_after.isoformat(),
            },
        )
        superseded: list[Revocation] = []
        if request.revoke_previous:
            superseded = _revoke_rows(
                conn,
                ca,
                "device_id = %s AND serial_hex <> %s",
                [request.device_id, issued.serial_hex],
                RevocationReason.superseded,
                actor,
                crl_days=crl_days,
            )
    return Enrollment(issued, [r.serial_hex for r in superseded])


def revoke(
    conn: psycopg.Connection,
    ca: CertificateAuthority,
    *,
    serial: str | None,
    device_id: str | None,
    reason: RevocationReason,
    actor: Actor,
    crl_days: float,
) -> list[Revocation]:
    """Revoke one certificate (by serial) or every active one of a device, and re-sign the CRL."""
    if bool(serial) == bool(device_id):
        raise EnrollmentError("give exactly one of serial or device_id")
    if serial:
        where, params = "serial_hex = %s", [normalise_serial(serial)]
    else:
        where, params = "device_id = %s", [validate_device_id(device_id or "")]
    with conn.transaction():
        revoked = _revoke_rows(conn, ca, where, params, reason, actor, crl_days=crl_days)
        if not revoked:
            counted = conn.execute(
                f"SELECT count(*) FROM device_certificates WHERE {where}",  # noqa: S608 - fixed SQL
                params,
            ).fetchone()
            assert counted is not None  # an aggregate without GROUP BY returns one row
            known = counted[0]
            target = f"serial {params[0]}" if serial else f"device {params[0]}"
            raise EnrollmentError(
                f"{target} has no active certificate to revoke"
                if known
                else f"{target} is not in the certificate registry"
            )
    return revoked


def _revoke_rows(
    conn: psycopg.Connection,
    ca: CertificateAuthority,
    where: str,
    params: list[str],
    reason: RevocationReason,
    actor: Actor,
    *,
    crl_days: float,
) -> list[Revocation]:
    """Mark matching active rows revoked, audit them and re-sign the CRL (caller's transaction)."""
    rows = conn.execute(
        f"""
        UPDATE device_certificates SET revoked_at = now(), reason = %s
         WHERE revoked_at IS NULL AND {where}
        RETURNING serial_hex, device_id
        """,  # noqa: S608 - `where` is one of the fixed predicates above; values are parameters
        [reason.value, *params],
    ).fetchall()
    revoked = [Revocation(serial_hex, device) for serial_hex, device in rows]
    for row in revoked:
        _audit(conn, "revoke", row.serial_hex, row.device_id, actor, {"reason": reason.value})
    if revoked:
        publish_crl(conn, ca, crl_days=crl_days)
    return revoked


def publish_crl(
    conn: psycopg.Connection, ca: CertificateAuthority, *, crl_days: float
) -> x509.CertificateRevocationList:
    """Re-sign the CRL with every revoked serial of the registry (caller's transaction).

    The registry is the source of truth, so a refresh can never drop a revocation; the
    advisory lock, held until the caller commits, orders concurrent writers.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", [CRL_LOCK])
    rows = conn.execute(
        "SELECT serial_hex, reason FROM device_certificates WHERE revoked_at IS NOT NULL"
    ).fetchall()
    serials = {int(serial, 16): RevocationReason(reason).flag for serial, reason in rows}
    return ca.write_crl(revoke_serials=serials, days=crl_days)


def _audit(
    conn: psycopg.Connection,
    action: str,
    serial_hex: str | None,
    device_id: str | None,
    actor: Actor,
    detail: dict[str, str],
) -> None:
    conn.execute(
        """
        INSERT INTO certificate_audit (action, serial_hex, device_id, actor, dagster_run_id, detail)
        VALUES (%s, %s, %s, %s, %s, %s::jsonb)
        """,
        [action, serial_hex, device_id, actor.name, actor.run_id, json.dumps(detail)],
    )


def denied_identities(conn: psycopg.Connection) -> list[str]:
    """Devices that hold revoked certificates and no valid one: the broker ACL denies them."""
    rows = conn.execute(
        """
        SELECT device_id FROM device_certificates
         GROUP BY device_id
        HAVING bool_or(revoked_at IS NOT NULL)
           AND NOT bool_or(revoked_at IS NULL AND not_after > now())
         ORDER BY device_id
        """
    ).fetchall()
    return [device_id for (device_id,) in rows]


@dataclass(frozen=True)
class CertificateRow:
    serial_hex: str
    device_id: str
    fingerprint_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    reason: str | None

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return f"revoked ({self.reason})"
        if self.not_after <= dt.datetime.now(dt.UTC):
            return "expired"
        return "valid"


def certificates(conn: psycopg.Connection, device_id: str | None = None) -> list[CertificateRow]:
    """The registry's certificates, newest first, optionally for one device."""
    rows = conn.execute(
        """
        SELECT serial_hex, device_id, fingerprint_sha256, not_before, not_after, revoked_at, reason
          FROM device_certificates
         WHERE %(device)s::text IS NULL OR device_id = %(device)s
         ORDER BY device_id, not_before DESC, issued_at DESC
        """,
        {"device": device_id},
    ).fetchall()
    return [CertificateRow(*row) for row in rows]
