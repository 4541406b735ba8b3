"""PKI assets: the published CRL (kept fresh by a schedule) and the certificate inventory.

An expired CRL locks every device out (the broker refuses all handshakes), so the CRL
is re-signed every few hours and its freshness is an ERROR check.
"""

import datetime as dt

import dagster as dg

from iot_platform.defs.keys import CRL, DEVICE_CERTIFICATES
from iot_platform.defs.pki.enrollment import publish_to_broker
from iot_platform.defs.resources import BrokerControlResource, PKIResource, WarehouseResource
from iot_platform.enrollment import publish_crl
from iot_platform.health import Evaluation, HealthSettings, expiring_certificates
from iot_platform.pki import utcnow
from iot_platform.pki_runs import PKI_JOB_TAGS
from iot_platform.settings import CRL_REFRESH_HOURS


@dg.asset(
    key=CRL,
    group_name="pki",
    description="The CRL the broker reads: every revoked serial of the registry, re-signed "
    "with a fresh nextUpdate, then reloaded by the broker.",
)
def crl(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    pki: PKIResource,
    broker: BrokerControlResource,
) -> dg.MaterializeResult:
    ca = pki.authority()
    with warehouse.connect() as conn:
        signed = publish_crl(conn, ca, crl_days=pki.crl_days)
    _denied, broker_action = publish_to_broker(context, broker, ca.certs_dir, warehouse)
    next_update = signed.next_update_utc
    if next_update is None:  # write_crl always sets one; a CRL without it would never expire
        raise dg.Failure(f"the CRL signed at {ca.crl_path} has no nextUpdate")
    until = f"{next_update:%Y-%m-%d %H:%M}Z"
    context.log.info(f"CRL re-signed until {until}; {broker_action}")
    return dg.MaterializeResult(
        metadata={
            "next_update": next_update.isoformat(),
            "revoked_entries": len(signed),
            "path": dg.MetadataValue.path(str(ca.crl_path)),
            "broker": broker_action,
        }
    )


@dg.asset_check(asset=CRL, blocking=False, description="The published CRL is not about to expire.")
def crl_not_expiring(pki: PKIResource) -> dg.AssetCheckResult:
    ca = pki.authority()
    published = ca.load_crl()
    margin = dt.timedelta(hours=pki.crl_min_remaining_hours)
    if published is None or published.next_update_utc is None:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"problem": f"no CRL at {ca.crl_path}: materialise pki/crl"},
        )
    remaining = published.next_update_utc - utcnow()
    return dg.AssetCheckResult(
        passed=remaining > margin,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "next_update": published.next_update_utc.isoformat(),
            "hours_remaining": round(remaining.total_seconds() / 3600, 2),
            "min_remaining_hours": pki.crl_min_remaining_hours,
            "action": "when failing: materialise pki/crl (or check the crl_refresh_schedule)",
        },
    )


@dg.asset(
    key=DEVICE_CERTIFICATES,
    group_name="pki",
    description="Certificate inventory over device_certificates (enroll/revoke runs add events).",
)
def device_certificates(warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.connect() as conn:
        counts = conn.execute(
            """
            SELECT count(*) FILTER (WHERE revoked_at IS NULL AND not_after > now()),
                   count(*) FILTER (WHERE revoked_at IS NOT NULL),
                   count(*) FILTER (WHERE revoked_at IS NULL AND not_after <= now()),
                   count(DISTINCT device_id)
              FROM device_certificates
            """
        ).fetchone()
    assert counts is not None  # aggregates without GROUP BY return one row
    active, revoked, expired, devices = counts
    return dg.MaterializeResult(
        metadata={
            "active": active,
            "revoked": revoked,
            "expired": expired,
            "devices_with_certificates": devices,
        }
    )


def _failing_devices_result(rows: list[tuple], what: str) -> dg.AssetCheckResult:
    devices = sorted({row[0] for row in rows})
    return dg.AssetCheckResult(
        passed=not rows,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "failing_devices": len(devices),
            "failing_device_ids": dg.MetadataValue.json(devices[:100]),
            "details": dg.MetadataValue.json(
                [dict(zip(("device_id", what), map(str, row), strict=True)) for row in rows[:50]]
            ),
        },
    )


@dg.asset_check(
    asset=DEVICE_CERTIFICATES,
    description="Devices whose newest valid certificate expires within "
    "IOT_HEALTH_CERT_EXPIRY_DAYS (30): re-enroll them.",
)
def certificates_expiring_soon(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connect() as conn:
        failing = expiring_certificates(Evaluation(conn, HealthSettings.from_env(), utcnow()))
    return _failing_devices_result(
        [(device, detail["not_after"]) for device, detail in failing], "not_after"
    )


@dg.asset_check(
    asset=DEVICE_CERTIFICATES,
    description="Registered devices with no valid certificate cannot connect: enroll them.",
)
def devices_without_valid_certificate(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connect() as conn:
        rows = conn.execute(
            """
            SELECT d.device_id, coalesce(max(c.not_after)::text, 'never enrolled')
              FROM devices d LEFT JOIN device_certificates c ON c.device_id = d.device_id
             GROUP BY d.device_id
            HAVING NOT coalesce(bool_or(c.revoked_at IS NULL AND c.not_after > now()), false)
             ORDER BY d.device_id
            """
        ).fetchall()
    return _failing_devices_result(rows, "last_not_after")


crl_refresh_job = dg.define_asset_job(
    "crl_refresh_job",
    selection=dg.AssetSelection.assets(CRL, DEVICE_CERTIFICATES),
    tags=PKI_JOB_TAGS,
    description="Re-sign and publish the CRL, refresh the inventory, run their checks.",
)

crl_refresh_schedule = dg.ScheduleDefinition(
    name="crl_refresh_schedule",
    job=crl_refresh_job,
    cron_schedule=f"0 */{CRL_REFRESH_HOURS} * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 6 hours, far inside the CRL's IOT_CRL_DAYS validity.",
)
