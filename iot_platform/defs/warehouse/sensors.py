"""The raw batch sensor: new objects -> at most one load run in flight per receive hour.

Each tick lists new batch keys (``iot_platform.discovery``) and requests a run for every
hour that has no load run queued or running, with all of that hour's pending keys (up to
``IOT_SENSOR_MAX_KEYS``) as the manifest. Keys of an hour whose run is still in flight
wait in the cursor for the next run, so a slow machine gets bigger runs, not a longer run
queue. The run, once its manifest is loaded, follows its hour for up to
``IOT_LOAD_FOLLOW_S`` (default: to the hour's end; ``warehouse/follow.py``) and loads
most of those waiting keys itself; each tick drops from the cursor the keys the ledger
already holds.

A run that fails is retried by Dagster (``dagster/max_retries`` on the job); one
that fails for good leaves its batches unloaded and visible in the UI, and a backfill of
its hour loads them (the ledger makes that idempotent).
"""

import datetime as dt
import hashlib

import dagster as dg
import psycopg

from iot_platform.defs.keys import RAW_BATCHES, TELEMETRY
from iot_platform.defs.partitions import partitions_in_flight
from iot_platform.defs.resources import ObjectStoreResource, WarehouseResource
from iot_platform.defs.warehouse.jobs import load_job
from iot_platform.discovery import Cursor, Discovery, discover, plan_runs
from iot_platform.objectstore import ObjectStoreError
from iot_platform.settings import env_float, env_int
from iot_platform.warehouse.load import ledger_etags

# The Dagster daemon's sensor loop runs every 5 s and evaluates a sensor whose interval has
# passed. An interval of exactly 5 s missed every other loop by milliseconds (ticks were 5
# or 10 s apart); 1 s makes every loop tick, so a batch waits at most ~5 s for the sensor.
SENSOR_INTERVAL_S = env_int("IOT_SENSOR_INTERVAL_S", 1, minimum=1)


def _discover(object_store: ObjectStoreResource, cursor: Cursor, room: int) -> Discovery:
    return discover(
        object_store.store(),
        cursor,
        dt.datetime.now(dt.UTC),
        lateness=dt.timedelta(seconds=env_float("IOT_SENSOR_LATENESS_S", 900, minimum=0)),
        max_keys=room,
    )


def _without(keys_by_hour: dict[str, list[str]], loaded: set[str]) -> dict[str, list[str]]:
    kept = {hour: [k for k in keys if k not in loaded] for hour, keys in keys_by_hour.items()}
    return {hour: keys for hour, keys in kept.items() if keys}


def _drop_loaded(
    warehouse: WarehouseResource, pending: dict[str, list[str]], found: dict[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]], int]:
    """``pending`` and ``found`` without the keys the ledger holds (a following run loaded
    them), and how many were dropped."""
    keys = [key for hours in (pending, found) for keys in hours.values() for key in keys]
    with warehouse.connect() as conn:
        loaded = set(ledger_etags(conn, keys))
    return _without(pending, loaded), _without(found, loaded), len(loaded)


@dg.sensor(
    name="raw_batch_sensor",
    job=load_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists new raw batches (recent hour prefixes, start_after the cursor) and "
    "requests a load run for each receive hour that has none in flight, with all the hour's "
    "pending batch keys as its manifest; keys of busy hours wait for the next run.",
)
def raw_batch_sensor(
    context: dg.SensorEvaluationContext,
    object_store: ObjectStoreResource,
    warehouse: WarehouseResource,
):
    cursor = Cursor.loads(context.cursor)
    max_pending = env_int("IOT_SENSOR_MAX_PENDING", 20_000, minimum=1)
    room = max_pending - cursor.pending_count
    found: dict[str, list[str]] = {}
    notes: list[str] = []
    if room > 0:
        try:
            discovery = _discover(object_store, cursor, room)
        except ObjectStoreError as exc:
            discovery = None
            notes.append(f"object store unavailable, will retry: {exc}")
        if discovery is not None:
            if discovery.ignored:
                context.log.warning(
                    f"{len(discovery.ignored)} objects under raw/v1/ do not follow the key "
                    f"contract, e.g. {discovery.ignored[:3]}"
                )
            found = discovery.by_partition
            cursor = discovery.cursor
            notes.append(f"{discovery.new_keys} new batches ({discovery.listed} listed)")
            if discovery.capped:
                notes.append("listing capped by IOT_SENSOR_MAX_PENDING; the rest next tick")
    else:
        notes.append(
            f"listing paused: {cursor.pending_count} batches already pending "
            f"(IOT_SENSOR_MAX_PENDING={max_pending}) behind runs in flight"
        )

    if cursor.pending or found:
        try:
            cursor.pending, found, dropped = _drop_loaded(warehouse, cursor.pending, found)
        except psycopg.Error as exc:
            notes.append(f"warehouse unavailable, keys kept pending: {exc}")
        else:
            if dropped:
                notes.append(f"{dropped} batches already loaded by a following run")

    in_flight = partitions_in_flight(context.instance, load_job.name, TELEMETRY)
    plan = plan_runs(
        cursor.pending,
        found,
        in_flight,
        max_keys_per_run=env_int("IOT_SENSOR_MAX_KEYS", 2000, minimum=1),
    )
    cursor.pending = plan.waiting
    if plan.waiting:
        notes.append(
            f"{plan.waiting_count} batches of {sorted(plan.waiting)} wait for the hour's run "
            "in flight; they go into its next run"
        )
    # Default: the hour. Each hand-over between two runs of an hour left ~10-20 s with
    # nothing loading (the run's last rollups, a sensor tick, launch, imports); at 50,000
    # rows/s on 2 cores the backlog that built up meanwhile took a minute to catch up, and
    # the hand-overs every 5 minutes set the p95. Under steady traffic a live run now
    # follows its hour to the end; a quiet spell (30 s) or a queued backfill still ends it.
    follow_s = env_float("IOT_LOAD_FOLLOW_S", 3600, minimum=0)
    requests = []
    observations = []
    for partition, keys in plan.runs.items():
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        requests.append(
            dg.RunRequest(
                run_key=f"{partition}:{digest}",
                partition_key=partition,
                run_config={
                    "ops": {
                        "load_raw_batches": {"config": {"batch_keys": keys, "follow_s": follow_s}}
                    }
                },
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
    summary = "; ".join(notes)
    if requests:
        context.log.info(f"{summary}; requested {len(requests)} runs")
    return dg.SensorResult(
        run_requests=requests,
        cursor=cursor.dumps(),
        asset_events=observations,
        skip_reason=None if requests else summary,
    )
