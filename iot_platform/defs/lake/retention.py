"""``lifecycle/raw_batch_retention``: delete raw micro-batches the lake and the warehouse
no longer need (``iot_platform.lake.expire_raw_batches``).

A batch goes only when the load ledger (``ingest_batches``) has it, the hour's manifest
holds it, the hour's files still verify against the manifest, and both the load and the
compaction are ``IOT_RAW_BATCH_RETENTION_HOURS`` old. Everything else stays, counted by
the reason in the pass's metadata. An asset, like the warehouse retention, so each pass
is a materialisation with what it deleted, next to the check that says what blocks it.
"""

import datetime as dt
import time

import dagster as dg

from iot_platform.defs.keys import TELEMETRY
from iot_platform.defs.lake.compaction import RAW_LAKE
from iot_platform.defs.resources import ObjectStoreResource, WarehouseResource
from iot_platform.lake import expire_raw_batches
from iot_platform.settings import LakeSettings

RAW_BATCH_RETENTION = dg.AssetKey(["lifecycle", "raw_batch_retention"])
LIFECYCLE_CLEAR = "raw_batches_not_held_back"


@dg.asset(
    key=RAW_BATCH_RETENTION,
    group_name="lifecycle",
    deps=[RAW_LAKE, TELEMETRY],
    kinds={"parquet", "s3"},
    check_specs=[
        dg.AssetCheckSpec(
            LIFECYCLE_CLEAR,
            asset=RAW_BATCH_RETENTION,
            description="No hour past the retention is held back: every one is compacted, "
            "holds no late batch and its lake files verify.",
        )
    ],
    description=(
        "Deletes raw micro-batches that are loaded, compacted into raw/raw_lake and "
        "verified, all at least IOT_RAW_BATCH_RETENTION_HOURS ago. Metadata: what was "
        "deleted, and what was kept and why."
    ),
)
def raw_batch_retention(
    context: dg.AssetExecutionContext,
    object_store: ObjectStoreResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    settings = LakeSettings.from_env()
    started = time.monotonic()
    with warehouse.connect() as conn:

        def loaded_at(partition_key: str) -> dict[str, dt.datetime]:
            rows = conn.execute(
                "SELECT object_key, loaded_at FROM ingest_batches WHERE partition_key = %s",
                [partition_key],
            ).fetchall()
            conn.commit()  # no transaction left open across object-store calls
            return dict(rows)

        report = expire_raw_batches(
            object_store.store(),
            loaded_at,
            dt.datetime.now(dt.UTC),
            retention=dt.timedelta(hours=settings.raw_retention_hours),
        )
    context.log.info(
        f"deleted {report.deleted} raw batches ({report.deleted_bytes} bytes); kept {report.kept}"
    )
    held_back = report.uncompacted_hours + report.late_hours + sorted(report.failed_hours)
    return dg.MaterializeResult(
        metadata={
            "deleted_batches": report.deleted,
            "deleted_bytes": report.deleted_bytes,
            "hours_scanned": report.hours_scanned,
            "hours_emptied": dg.MetadataValue.json(report.hours_emptied),
            "kept_by_reason": dg.MetadataValue.json(report.kept),
            "retention_hours": settings.raw_retention_hours,
            "duration_s": round(time.monotonic() - started, 3),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=LIFECYCLE_CLEAR,
                passed=not held_back,
                # a lake file that no longer verifies is data at risk; an uncompacted hour
                # only costs storage until it is backfilled
                severity=dg.AssetCheckSeverity.ERROR
                if report.failed_hours
                else dg.AssetCheckSeverity.WARN,
                metadata={
                    "uncompacted_hours": dg.MetadataValue.json(report.uncompacted_hours),
                    "hours_with_late_batches": dg.MetadataValue.json(report.late_hours),
                    "unverified_hours": dg.MetadataValue.json(report.failed_hours),
                    "action": "backfill these partitions of raw/raw_lake (they re-compact from "
                    "the micro-batches and the previous files), then materialise "
                    "lifecycle/raw_batch_retention again",
                },
            )
        ],
    )


raw_batch_retention_job = dg.define_asset_job(
    "raw_batch_retention_job",
    selection=dg.AssetSelection.assets(RAW_BATCH_RETENTION),
    description="One retention pass over the raw micro-batches.",
)

raw_batch_retention_schedule = dg.ScheduleDefinition(
    name="raw_batch_retention_schedule",
    job=raw_batch_retention_job,
    cron_schedule="41 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly; each pass scans at most a week of hours from the oldest batch.",
)
