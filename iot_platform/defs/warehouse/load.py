"""Raw batches (external) -> ``telemetry`` + ``device_events``, one hourly partition per run.

A run given a manifest (``batch_keys``, written by the sensor) loads those of its batches
the ledger does not hold yet — the live path — and then, when the sensor asks it to
(``follow_s``), keeps loading the hour's new batches as they land (``warehouse/follow.py``).
A run without a manifest reloads every batch under its receive hour — a backfill from the
UI, say after a decoder fix. Both are idempotent through the ``ingest_batches`` ledger.

(No ``from __future__ import annotations`` in Dagster definition modules: Dagster reads
the Config and resource annotations at import time.)
"""

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable

import dagster as dg
from pydantic import Field

from iot_platform.decode import DEFAULT_MAX_PAYLOAD_BYTES, TsWindow
from iot_platform.defs.keys import DEVICE_EVENTS, RAW_BATCHES, TELEMETRY
from iot_platform.defs.partitions import hourly_partitions, partition_start
from iot_platform.defs.resources import ObjectStoreResource, WarehouseResource
from iot_platform.defs.warehouse.retry import LOAD_RETRY
from iot_platform.objectstore import ObjectInfo, ObjectNotFound, ObjectStore, ObjectStoreError
from iot_platform.rawbatch import hour_prefix
from iot_platform.services.process import PROGRESS_EVERY_S
from iot_platform.settings import PlatformSettings
from iot_platform.warehouse.follow import POLL_S, FollowWindow, HourListing, RollupsBeside
from iot_platform.warehouse.load import (
    BatchLoad,
    known_devices,
    load_objects,
    load_parameters,
    not_yet_loaded,
)

# How often a following run asks whether a run for its hour (a backfill) waits behind it.
QUEUE_CHECK_S = 5.0


def _run_waits_for(instance: dg.DagsterInstance, partition: str) -> bool:
    """A queued run of the same hour (a backfill, a manual run) waits for this one: the
    run coordinator allows one per hour."""
    waiting = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED], tags={"dagster/partition": partition}),
        limit=1,
    )
    return bool(waiting)


class LoadConfig(dg.Config):
    batch_keys: list[str] = Field(
        default_factory=list,
        description="Object keys to load (the sensor's manifest). Empty: every batch of the hour.",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        description="Payloads larger than this are rejected as oversized (not parsed).",
    )
    follow_s: float = Field(
        default=0,
        ge=0,
        description="After the manifest, keep loading the hour's new batches as they land "
        "for up to this many seconds (the sensor sets IOT_LOAD_FOLLOW_S). 0: manifest only.",
    )


@dg.multi_asset(
    name="load_raw_batches",
    specs=[
        dg.AssetSpec(
            TELEMETRY,
            deps=[RAW_BATCHES],
            group_name="warehouse",
            kinds={"postgres", "polars"},
            description="One row per measurement, unique on (device_id, metric, ts).",
        ),
        dg.AssetSpec(
            DEVICE_EVENTS,
            deps=[RAW_BATCHES],
            group_name="warehouse",
            kinds={"postgres"},
            description="hello / status / command ack / OTA messages with their JSON body.",
        ),
    ],
    partitions_def=hourly_partitions,
    retry_policy=LOAD_RETRY,
)
def load_raw_batches(
    context: dg.AssetExecutionContext,
    config: LoadConfig,
    warehouse: WarehouseResource,
    object_store: ObjectStoreResource,
):
    started = time.monotonic()
    partition = context.partition_key
    prefix = hour_prefix(partition_start(partition))
    store = object_store.store()
    try:
        if config.batch_keys:
            outside = [k for k in config.batch_keys if not k.startswith(prefix)]
            if outside:
                raise dg.Failure(
                    f"{len(outside)} manifest keys are not in partition {partition} "
                    f"({prefix}): {outside[:3]}",
                    allow_retries=False,
                )
            infos = [store.stat(key) for key in config.batch_keys]
            mode = "manifest"
        else:
            infos = store.list(prefix)
            mode = "backfill (every batch of the hour)"
    except ObjectNotFound as exc:
        raise dg.Failure(
            f"a manifest key is missing from the object store: {exc}", allow_retries=False
        ) from exc
    context.log.info(f"partition {partition}: loading {len(infos)} batches ({mode})")

    settings = PlatformSettings.from_env()
    ts_window = TsWindow(
        ahead=dt.timedelta(seconds=settings.ts_max_ahead_s),
        age=dt.timedelta(seconds=settings.ts_max_age_s),
    )
    loads: list[BatchLoad] = []
    follow_ended = "-"
    rollups_beside = 0
    with warehouse.connect() as conn:
        progress = {"next_note": time.monotonic() + PROGRESS_EVERY_S}

        def load_batches(batch_infos: list[ObjectInfo]) -> None:
            if config.batch_keys:
                # The live path loads what is new: another run (the hour's previous one,
                # or this one's own listing overlap) may have loaded some already.
                batch_infos = not_yet_loaded(conn, batch_infos)
            # Read afresh for every call: a following run lasts minutes, and a device
            # enrolled meanwhile must not be rejected as unknown.
            parameters = load_parameters(conn)
            devices = known_devices(conn)
            conn.commit()  # end the read, so each batch below is a transaction of its own
            batches = load_objects(
                conn,
                store,
                batch_infos,
                run_id=context.run.run_id,
                parameters=parameters,
                devices=devices,
                max_payload_bytes=config.max_payload_bytes,
                ts_window=ts_window,
            )
            for _decoded, batch, _seconds in batches:
                loads.append(batch)
                # Every event is a write to Dagster's storage: progress every 10 s, not per
                # batch (a following run loads one or more every second).
                if time.monotonic() >= progress["next_note"]:
                    progress["next_note"] = time.monotonic() + PROGRESS_EVERY_S
                    context.log.info(f"{len(loads)} batches loaded so far")

        load_batches(infos)
        if config.follow_s > 0:
            beside = RollupsBeside(
                lambda: warehouse.connect(autocommit=True), warehouse.dialect(), context.run.run_id
            )
            follow_ended = _follow(
                context, config.follow_s, store, config.batch_keys, load_batches, beside
            )
            rollups_beside = beside.refreshed
        context.log.info(f"{len(loads)} batches loaded")

    rejects: Counter[str] = Counter()
    for load in loads:
        rejects.update(load.rejects_by_reason)
    times = [t for load in loads for t in (load.min_ts, load.max_ts) if t is not None]
    common: dict[str, str | int | float] = {
        "batches": len(loads),
        "reloaded_batches": sum(load.reloaded for load in loads),
        "mode": mode,
        "follow_ended": follow_ended,
        "batches_rolled_up_while_following": rollups_beside,
        "duration_s": round(time.monotonic() - started, 3),
        "ts_min": str(min(times)) if times else "-",
        "ts_max": str(max(times)) if times else "-",
    }
    yield dg.MaterializeResult(
        asset_key=TELEMETRY,
        metadata={
            **common,
            "rows_loaded": sum(load.telemetry_rows for load in loads),
            "raw_messages": sum(load.raw_rows for load in loads),
            "duplicates_dropped": sum(load.duplicate_rows for load in loads),
            "rejects": sum(rejects.values()),
            "rejects_by_reason": dg.MetadataValue.json(dict(rejects)),
        },
    )
    yield dg.MaterializeResult(
        asset_key=DEVICE_EVENTS,
        metadata={**common, "rows_loaded": sum(load.event_rows for load in loads)},
    )


def _follow(
    context: dg.AssetExecutionContext,
    follow_s: float,
    store: ObjectStore,
    manifest: list[str],
    load: Callable[[list[ObjectInfo]], None],
    beside: RollupsBeside,
) -> str:
    """Load the hour's new batches as they land, the rollups refreshing beside; returns
    why it stopped."""
    now = time.monotonic()
    window = FollowWindow(
        deadline=now + follow_s,
        hour_end=partition_start(context.partition_key) + dt.timedelta(hours=1),
        last_new=now,
    )
    listing = HourListing(store, partition_start(context.partition_key))
    listing.mark_seen(manifest)
    context.log.info(f"following partition {context.partition_key} for up to {follow_s:g} s")
    next_queue_check = now + QUEUE_CHECK_S
    reason = None
    try:
        while reason is None:
            time.sleep(POLL_S)
            try:
                fresh = listing.new_batches()
            except ObjectStoreError as exc:
                context.log.warning(f"listing failed, trying again: {exc}")
                fresh = []
            if fresh:
                load(fresh)
                window.saw_new(time.monotonic())
            now = time.monotonic()
            reason = window.stop_reason(now, dt.datetime.now(dt.UTC), bool(fresh))
            if reason is None and now >= next_queue_check:
                next_queue_check = now + QUEUE_CHECK_S
                if _run_waits_for(context.instance, context.partition_key):
                    reason = "a queued run of this hour (a backfill or manual run) goes first"
            if reason is None:  # a refresh started now would hold the hand-over up
                beside.tick(now)
            while beside.errors:
                context.log.warning(f"rollup refresh beside the load failed: {beside.errors.pop()}")
    finally:
        beside.join()  # the rollup steps must not overlap it, nor a retry of this step
    context.log.info(f"stopped following: {reason}")
    return reason
