"""``lifecycle/warehouse_retention``: drop what each warehouse table no longer keeps.

An asset (not an op) so that every pass is a materialisation in the UI with what it
dropped per table as metadata, and the settings in force are visible next to it. On
TimescaleDB the pass also keeps the retention and compression policies in line with the
settings (they go on working in the background when Dagster is down); on plain
PostgreSQL the pass itself is the mechanism: bounded batched deletes within a time
budget. The ``retention_caught_up`` check warns when the budget ran out before a table's
backlog was gone, so a growing backlog is seen before the disk fills.
"""

import time

import dagster as dg

from iot_platform.defs.keys import (
    DEVICE_EVENTS,
    TELEMETRY,
    TELEMETRY_1D,
    TELEMETRY_1H,
    TELEMETRY_1M,
)
from iot_platform.defs.resources import WarehouseResource
from iot_platform.settings import RetentionSettings
from iot_platform.warehouse.retention import TableRetention, run_retention

WAREHOUSE_RETENTION = dg.AssetKey(["lifecycle", "warehouse_retention"])
CAUGHT_UP = "retention_caught_up"


Metadata = dict[str, dg.MetadataValue | int | float | str]


def retention_metadata(results: list[TableRetention]) -> Metadata:
    """Per table: rows (and chunks) dropped, what it keeps, how, and the cutoff."""
    lines = ["| table | keeps (days) | method | cutoff | rows dropped | chunks dropped |"]
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        keeps = "forever" if r.keep_days is None else f"{r.keep_days:g}"
        cutoff = r.cutoff.isoformat(timespec="seconds") if r.cutoff else ""
        more = "" if r.complete else " (more next pass)"
        lines.append(
            f"| {r.table} | {keeps} | {r.method} | {cutoff} | {r.rows_dropped}{more} "
            f"| {len(r.chunks_dropped)} |"
        )
    metadata: Metadata = {f"{r.table}_rows_dropped": r.rows_dropped for r in results}
    metadata["rows_dropped"] = sum(r.rows_dropped for r in results)
    metadata["tables"] = dg.MetadataValue.md("\n".join(lines))
    metadata["chunks_dropped"] = dg.MetadataValue.json(
        {r.table: r.chunks_dropped for r in results if r.chunks_dropped}
    )
    return metadata


@dg.asset(
    key=WAREHOUSE_RETENTION,
    group_name="lifecycle",
    deps=[TELEMETRY, TELEMETRY_1M, TELEMETRY_1H, TELEMETRY_1D, DEVICE_EVENTS],
    kinds={"timescaledb", "postgres"},
    check_specs=[
        dg.AssetCheckSpec(
            CAUGHT_UP,
            asset=WAREHOUSE_RETENTION,
            description="Every table's rows older than its retention were dropped in the pass.",
        )
    ],
    description=(
        "Drops warehouse rows older than each table's retention (IOT_RETENTION_*_DAYS, "
        "IOT_HEALTH_RETENTION_DAYS): TimescaleDB retention policies on telemetry and its "
        "rollups, bounded batched deletes elsewhere. Metadata: what each table dropped."
    ),
)
def warehouse_retention(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    settings = RetentionSettings.from_env()
    dialect = warehouse.dialect()
    started = time.monotonic()
    with warehouse.connect(autocommit=True) as conn:
        results = run_retention(conn, dialect, settings)
    behind = [r.table for r in results if not r.complete]
    context.log.info(
        "retention dropped %s rows (%s)",
        sum(r.rows_dropped for r in results),
        ", ".join(f"{r.table} {r.rows_dropped}" for r in results if r.rows_dropped) or "none",
    )
    metadata = retention_metadata(results)
    metadata["dialect"] = dialect.value
    metadata["duration_s"] = round(time.monotonic() - started, 3)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=CAUGHT_UP,
                passed=not behind,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "tables_behind": dg.MetadataValue.json(behind),
                    "time_budget_s": settings.max_seconds,
                    "action": "when failing: the backlog outgrew IOT_RETENTION_MAX_SECONDS per "
                    "pass; raise it (or IOT_RETENTION_BATCH_ROWS), or materialise "
                    "lifecycle/warehouse_retention again until it passes",
                },
            )
        ],
    )


warehouse_retention_job = dg.define_asset_job(
    "warehouse_retention_job",
    selection=dg.AssetSelection.assets(WAREHOUSE_RETENTION),
    description="One retention pass over the warehouse tables.",
)

warehouse_retention_schedule = dg.ScheduleDefinition(
    name="warehouse_retention_schedule",
    job=warehouse_retention_job,
    cron_schedule="23 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Hourly: each pass is bounded (IOT_RETENTION_MAX_SECONDS), so a backlog is cleared "
        "over a few passes and never holds long locks or long transactions."
    ),
)
