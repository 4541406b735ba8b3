"""The raw batch sensor: new objects -> one run per receive hour with a manifest."""

import datetime as dt
import hashlib

import dagster as dg

from iot_platform.defs.assets.keys import RAW_BATCHES
from iot_platform.defs.jobs import load_job
from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.discovery import Cursor, discover
from iot_platform.objectstore import ObjectStoreError
from iot_platform.settings import env_float, env_int

SENSOR_INTERVAL_S = env_int("IOT_SENSOR_INTERVAL_S", 5, minimum=1)


@dg.sensor(
    name="raw_batch_sensor",
    job=load_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists new raw batches (recent hour prefixes, start_after the cursor) and "
    "requests one load run per receive hour with the batch keys as its manifest.",
)
def raw_batch_sensor(context: dg.SensorEvaluationContext, object_store: ObjectStoreResource):
    cursor = Cursor.loads(context.cursor)
    now = dt.datetime.now(dt.UTC)
    try:
        found = discover(
            object_store.store(),
            cursor,
            now,
            lateness=dt.timedelta(seconds=env_float("IOT_SENSOR_LATENESS_S", 900, minimum=0)),
            max_keys=env_int("IOT_SENSOR_MAX_KEYS", 2000, minimum=1),
        )
    except ObjectStoreError as exc:
        return dg.SkipReason(f"object store unavailable, will retry: {exc}")
    if found.ignored:
        context.log.warning(
            f"{len(found.ignored)} objects under raw/v1/ do not follow the key contract, "
            f"e.g. {found.ignored[:3]}"
        )
    if not found.by_partition:
        context.update_cursor(found.cursor.dumps())
        return dg.SkipReason(
            f"no new raw batches ({found.listed} objects listed since "
            f"{cursor.last_key or 'the lookback start'})"
        )
    requests = []
    observations = []
    for partition, keys in sorted(found.by_partition.items()):
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        requests.append(
            dg.RunRequest(
                run_key=f"{partition}:{digest}",
                partition_key=partition,
                run_config={"ops": {"load_raw_batches": {"config": {"batch_keys": keys}}}},
                tags={"iot/batches": str(len(keys))},
            )
        )
        observations.append(
            dg.AssetObservation(
                asset_key=RAW_BATCHES,
                partition=partition,
                metadata={"new_batches": len(keys), "last_key": keys[-1]},
            )
        )
    context.log.info(
        f"{found.new_keys} new batches in {len(requests)} hours"
        + (" (capped; the rest next tick)" if found.capped else "")
    )
    return dg.SensorResult(
        run_requests=requests, cursor=found.cursor.dumps(), asset_events=observations
    )
