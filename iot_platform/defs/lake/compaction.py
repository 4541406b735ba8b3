"""``raw/raw_lake``: each closed receive hour's micro-batches as a few large sorted Parquet
files (``iot_platform.lake``), one hourly partition per run.

A backfill from the UI compacts any range of hours; an hour that has not closed (plus
``IOT_LAKE_LATENESS_S``) fails clearly and changes nothing. The sensor requests every
closed hour of the last ``IOT_LAKE_LOOKBACK_HOURS`` that has micro-batches no manifest
holds: never compacted, or batches that landed after the compaction (the new generation
then merges the previous files with them). A late batch older than the look-back stays
readable (``raw_messages`` reads it alongside the hour's files) and is never deleted until
a backfill of its hour compacts it; the retention pass reports such hours.

(No ``from __future__ import annotations``: Dagster reads Config annotations at import.)
"""

import datetime as dt

import dagster as dg

from iot_platform.defs.keys import RAW_BATCHES
from iot_platform.defs.partitions import hourly_partitions, partition_start, partitions_in_flight
from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.defs.warehouse.retry import LOAD_RETRY
from iot_platform.lake import (
    LakeError,
    compact_hour,
    generation_of,
    hours_needing_compaction,
    manifest_key,
)
from iot_platform.objectstore import ObjectStoreError
from iot_platform.rawbatch import partition_key
from iot_platform.settings import LakeSettings

RAW_LAKE = dg.AssetKey(["raw", "raw_lake"])
SENSOR_INTERVAL_S = 300


@dg.asset(
    key=RAW_LAKE,
    group_name="ingest",
    deps=[RAW_BATCHES],
    partitions_def=hourly_partitions,
    kinds={"parquet", "s3"},
    retry_policy=LOAD_RETRY,
    description=(
        "The raw MQTT messages of each closed hour as a few large zstd Parquet files under "
        "lake/v1/date=…/hour=…/, sorted by (device_id, received_at) with row-group "
        "statistics, verified (row count + content checksum) against the micro-batches; "
        "the manifest lake/manifests/v1/… names the files and the batches they hold."
    ),
)
def raw_lake(
    context: dg.AssetExecutionContext, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    settings = LakeSettings.from_env()
    hour = partition_start(context.partition_key)
    try:
        result = compact_hour(
            object_store.store(),
            hour,
            dt.datetime.now(dt.UTC),
            lateness=dt.timedelta(seconds=settings.lateness_s),
            max_rows=settings.file_max_rows,
        )
    except LakeError as exc:  # an open hour or a failed verification: a retry cannot help
        raise dg.Failure(str(exc), allow_retries=False) from exc
    manifest = result.manifest
    rows = manifest.digest.rows if manifest else 0
    context.log.info(f"{context.partition_key}: {result.status}, {rows} rows")
    metadata: dict[str, dg.MetadataValue | str | int | float] = {
        "status": result.status,
        "rows": rows,
        "new_batches": result.new_batches,
        "previous_parts_merged": result.previous_parts,
        "removed_parts": len(result.removed_parts),
        "duration_s": round(result.seconds, 3),
    }
    if manifest is not None:
        metadata |= {
            "checksum": manifest.digest.hex,
            "generation": manifest.generation,
            "batches_held": len(manifest.sources),
            "files": len(manifest.parts),
            "bytes": sum(part.size for part in manifest.parts),
            "part_keys": dg.MetadataValue.json([part.key for part in manifest.parts]),
            "manifest": manifest_key(hour),
        }
    if result.status == "compacted" and result.seconds > 0:
        metadata["rows_per_s"] = round(rows / result.seconds)
    return dg.MaterializeResult(metadata=metadata)


raw_lake_compaction_job = dg.define_asset_job(
    "raw_lake_compaction_job",
    selection=dg.AssetSelection.assets(RAW_LAKE),
    description="Compact one closed receive hour of raw micro-batches into the lake.",
)


@dg.sensor(
    name="raw_lake_compaction_sensor",
    job=raw_lake_compaction_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Requests a compaction of every closed hour (IOT_LAKE_LATENESS_S) of the last "
        "IOT_LAKE_LOOKBACK_HOURS with micro-batches its manifest does not hold."
    ),
)
def raw_lake_compaction_sensor(
    context: dg.SensorEvaluationContext, object_store: ObjectStoreResource
) -> dg.SensorResult | dg.SkipReason:
    settings = LakeSettings.from_env()
    try:
        pending = hours_needing_compaction(
            object_store.store(),
            dt.datetime.now(dt.UTC),
            lateness=dt.timedelta(seconds=settings.lateness_s),
            lookback=dt.timedelta(hours=settings.lookback_hours),
        )
    except ObjectStoreError as exc:
        return dg.SkipReason(f"object store unavailable: {exc}")
    if not pending:
        return dg.SkipReason("every closed hour in the look-back is compacted")
    busy = partitions_in_flight(context.instance, raw_lake_compaction_job.name, RAW_LAKE)
    requests = []
    for hour, keys in sorted(pending.items()):
        partition = partition_key(hour)
        if partition in busy:
            continue  # its run may already hold these keys; look again next tick
        requests.append(
            dg.RunRequest(
                partition_key=partition,
                run_key=f"{partition}:{generation_of(keys)}",
                tags={"iot/new_batches": str(len(keys))},
            )
        )
    if not requests:
        return dg.SkipReason(f"{len(pending)} hours wait for their compaction run to finish")
    return dg.SensorResult(run_requests=requests)
