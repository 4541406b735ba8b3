"""The platform's Dagster code location (``iot_platform``, see ``workspace.yaml``): ingest,
warehouse, health and PKI. The analysts' dbt marts are the ``iot_analytics`` location
(``iot_platform.analytics_definitions``), so load runs never import dbt."""

from __future__ import annotations

import dagster as dg

from iot_platform.defs.assets import load, pki, rollups
from iot_platform.defs.checks import device_health_checks, device_health_job, device_health_schedule
from iot_platform.defs.enrollment import enroll_device, revoke_certificate
from iot_platform.defs.jobs import load_job
from iot_platform.defs.resources import build_resources
from iot_platform.defs.sensors import raw_batch_sensor

defs = dg.Definitions(
    assets=[
        load.raw_batches,
        load.load_raw_batches,
        *dg.load_assets_from_modules([rollups]),
        pki.crl,
        pki.device_certificates,
    ],
    asset_checks=[
        device_health_checks,
        pki.crl_not_expiring,
        pki.certificates_expiring_soon,
        pki.devices_without_valid_certificate,
    ],
    jobs=[load_job, device_health_job, enroll_device, revoke_certificate, pki.crl_refresh_job],
    sensors=[raw_batch_sensor],
    schedules=[device_health_schedule, pki.crl_refresh_schedule],
    resources=build_resources(),
    # One process per run, not per step: on a small machine a subprocess per step (each
    # importing Dagster, Polars and the definitions) was most of the publish->query delay.
    executor=dg.in_process_executor,
)
