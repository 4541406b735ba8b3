"""`enroll_device` and `revoke_certificate`: the operator's PKI jobs, launched from the Launchpad.

The Launchpad scaffolds the Pythonic config below. The CA passphrase comes from the
``pki`` resource (an env var), never from run config; a generated private key is written
to the certs directory only, and events carry its path, never its contents.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from iot_platform.defs.keys import DEVICE_CERTIFICATES
from iot_platform.defs.resources import BrokerControlResource, PKIResource, WarehouseResource
from iot_platform.enrollment import (
    Actor,
    EnrollmentRequest,
    RevocationReason,
    denied_identities,
    enroll,
    revoke,
)
from iot_platform.pki import PKIError
from iot_platform.pki_runs import ACTOR_TAG, ENROLL, PKI_JOB_TAGS, REVOKE
from iot_platform.services.process import ServiceError


class EnrollDeviceConfig(dg.Config):
    device_id: str = Field(description="1-64 of A-Z a-z 0-9 _ -; the certificate CN and MQTT id")
    device_type: str | None = Field(
        default=None,
        description="e.g. meter-dc, sensor, controller; empty keeps the registered type "
        "(generic for a new device)",
    )
    csr_pem: str = Field(
        default="",
        description="PEM CSR with CN = device_id (the device keeps its key). Empty: generate "
        "a key on the server (development only, IOT_ALLOW_SERVER_KEYGEN=true).",
    )
    validity_days: int | None = Field(
        default=None, description="certificate lifetime; default IOT_DEVICE_CERT_DAYS"
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="free-form labels")
    revoke_previous: bool = Field(
        default=False,
        description="revoke the device's earlier certificates (reason superseded); by default "
        "they stay valid until they expire so the device can roll over without a gap",
    )


class RevokeCertificateConfig(dg.Config):
    serial: str = Field(default="", description="certificate serial (hex); or give device_id")
    device_id: str = Field(default="", description="revoke every active certificate of it")
    reason: RevocationReason = Field(
        default=RevocationReason.unspecified, description="RFC 5280 reason code"
    )


def _actor(context: dg.OpExecutionContext) -> Actor:
    return Actor(context.run.tags.get(ACTOR_TAG, "dagster-ui"), context.run.run_id)


def publish_to_broker(
    context: dg.OpExecutionContext | dg.AssetExecutionContext,
    broker: BrokerControlResource,
    certs_dir: Path,
    warehouse: WarehouseResource,
) -> tuple[list[str], str]:
    """Publish the committed revocation state to the broker; returns (denied ids, what happened).

    Runs after the registry commit, so a broker that cannot be signalled (restarting, say)
    does not fail the run: the files are in place and it reads them when it starts.
    """
    with warehouse.connect() as conn:
        denied = denied_identities(conn)
    try:
        return denied, broker.publish(certs_dir, denied)
    except ServiceError as exc:
        context.log.warning(f"broker not reloaded: {exc}")
        return denied, f"files published; reload failed ({exc}): the broker reads them at start"


def _operator_error(exc: PKIError) -> dg.Failure:
    """A request the operator must change: fail clearly, and do not retry it."""
    return dg.Failure(description=str(exc), allow_retries=False)


@dg.op(
    name=ENROLL.op,
    description="Validate the request, register the device and issue its certificate.",
)
def issue_certificate(
    context: dg.OpExecutionContext,
    config: EnrollDeviceConfig,
    warehouse: WarehouseResource,
    pki: PKIResource,
    broker: BrokerControlResource,
):
    ca = pki.authority()
    request = EnrollmentRequest(
        device_id=config.device_id,
        device_type=config.device_type,
        csr_pem=config.csr_pem,
        validity_days=(
            pki.device_cert_days if config.validity_days is None else config.validity_days
        ),
        metadata=config.metadata,
        revoke_previous=config.revoke_previous,
    )
    try:
        with warehouse.connect() as conn:
            result = enroll(
                conn,
                ca,
                request,
                _actor(context),
                allow_server_keygen=pki.allow_server_keygen,
                crl_days=pki.crl_days,
            )
        _denied, broker_action = publish_to_broker(context, broker, ca.certs_dir, warehouse)
    except PKIError as exc:
        raise _operator_error(exc) from None
    cert = result.certificate
    context.log.info(
        f"issued certificate {cert.serial_hex} for {config.device_id} "
        f"(valid until {cert.not_after:%Y-%m-%d}); {broker_action}"
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "device_id": config.device_id,
        "serial_hex": cert.serial_hex,
        "fingerprint_sha256": cert.fingerprint_sha256,
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "certificate_pem": dg.MetadataValue.path(str(cert.cert_path)),
        "method": "csr" if config.csr_pem.strip() else "server_keygen",
        "superseded_serials": dg.MetadataValue.json(result.superseded),
        "broker": broker_action,
    }
    if cert.key_path is not None:
        metadata["private_key_file"] = dg.MetadataValue.path(str(cert.key_path))
    yield dg.AssetMaterialization(
        asset_key=DEVICE_CERTIFICATES,
        description=f"issued {cert.serial_hex} to {config.device_id}",
        metadata=metadata,
    )
    yield dg.Output(cert.serial_hex)


@dg.op(
    name=REVOKE.op,
    description="Revoke, re-sign the CRL, deny the identity at the broker, reload it.",
)
def revoke_certificates(
    context: dg.OpExecutionContext,
    config: RevokeCertificateConfig,
    warehouse: WarehouseResource,
    pki: PKIResource,
    broker: BrokerControlResource,
):
    ca = pki.authority()
    try:
        with warehouse.connect() as conn:
            revoked = revoke(
                conn,
                ca,
                serial=config.serial.strip() or None,
                device_id=config.device_id.strip() or None,
                reason=config.reason,
                actor=_actor(context),
                crl_days=pki.crl_days,
            )
        denied, broker_action = publish_to_broker(context, broker, ca.certs_dir, warehouse)
    except PKIError as exc:
        raise _operator_error(exc) from None
    serials = [r.serial_hex for r in revoked]
    devices = sorted({r.device_id for r in revoked})
    context.log.info(
        f"revoked {', '.join(serials)} ({config.reason.value}) of {', '.join(devices)}; "
        f"{broker_action}"
    )
    yield dg.AssetMaterialization(
        asset_key=DEVICE_CERTIFICATES,
        description=f"revoked {len(serials)} certificate(s) of {', '.join(devices)}",
        metadata={
            "revoked_serials": dg.MetadataValue.json(serials),
            "devices": dg.MetadataValue.json(devices),
            "reason": config.reason.value,
            "denied_at_broker": dg.MetadataValue.json([d for d in devices if d in denied]),
            "broker": broker_action,
        },
    )
    yield dg.Output(serials)


@dg.job(
    name=ENROLL.job,
    tags=PKI_JOB_TAGS,
    description="Register a device and issue its client certificate.",
)
def enroll_device():
    issue_certificate()


@dg.job(
    name=REVOKE.job,
    tags=PKI_JOB_TAGS,
    description="Revoke a certificate (by serial) or all of a device's.",
)
def revoke_certificate():
    revoke_certificates()
