"""Device-health asset checks on ``telemetry``: one check per rule of ``iot_platform.health``.

They run in their own job on a schedule, never inside a load run: a device-level finding
must not hold back the warehouse path (rollups for every other device), and evaluating
every rule once per load run made health cost grow with the load. A fixed schedule bounds
the rate, and also flags a device that goes silent when no data arrives at all. Each
evaluation writes ``device_health`` rows (history).
"""

import dagster as dg

from iot_platform.defs.keys import TELEMETRY
from iot_platform.defs.resources import WarehouseResource
from iot_platform.health import RULES, Evaluation, HealthSettings
from iot_platform.pki import utcnow


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(rule.name, asset=TELEMETRY, description=rule.description)
        for rule in RULES
    ],
    name="device_health_checks",
)
def device_health_checks(warehouse: WarehouseResource):
    settings = HealthSettings.from_env()
    with warehouse.connect() as conn:
        evaluation = Evaluation(conn, settings, utcnow())  # one clock for every rule
        for rule in RULES:
            result = evaluation.run(rule)
            severity = (
                dg.AssetCheckSeverity.ERROR
                if rule.severity == "error"
                else dg.AssetCheckSeverity.WARN
            )
            yield dg.AssetCheckResult(
                asset_key=TELEMETRY,
                check_name=rule.name,
                passed=result.passed,
                severity=severity,
                metadata={
                    "failing_devices": len(result.failing),
                    "devices_evaluated": result.evaluated,
                    "failing_device_ids": dg.MetadataValue.json(sorted(result.failing)[:100]),
                    "details": dg.MetadataValue.json(
                        {d: result.failing[d] for d in sorted(result.failing)[:20]}
                    ),
                },
            )


device_health_job = dg.define_asset_job(
    "device_health_job",
    selection=dg.AssetSelection.checks_for_assets(TELEMETRY),
    description="Evaluate the device-health rules without loading data (silent devices too).",
)

device_health_schedule = dg.ScheduleDefinition(
    name="device_health_schedule",
    job=device_health_job,
    cron_schedule="*/2 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 2 minutes, independent of load runs: flags devices even when no data "
    "arrives, and never holds back a load.",
)
