"""Raw batches (external) -> ``telemetry`` + ``device_events``, one hourly partition per run.

A run given a manifest (``batch_keys``, written by the sensor) loads exactly those
batches — the live path. A run without one loads every batch under its receive hour —
a backfill from the UI. Both are idempotent through the ``ingest_batches`` ledger.

(No ``from __future__ import annotations`` in Dagster definition modules: Dagster reads
the Config and resource annotations at import time.)
"""

import datetime as dt
import time
from collections import Counter

import dagster as dg
from pydantic import Field

from iot_platform.decode import DEFAULT_MAX_PAYLOAD_BYTES, TsWindow
from iot_platform.defs.keys import DEVICE_EVENTS, RAW_BATCHES, TELEMETRY
from iot_platform.defs.partitions import hourly_partitions, partition_start
from iot_platform.defs.resources import ObjectStoreResource, WarehouseResource
from iot_platform.defs.warehouse.retry import LOAD_RETRY
from iot_platform.objectstore import ObjectNotFound
from iot_platform.rawbatch import hour_prefix
from iot_platform.settings import PlatformSettings
from iot_platform.warehouse.load import BatchLoad, known_devices, load_objects, load_parameters


class LoadConfig(dg.Config):
    batch_keys: list[str] = Field(
        default_factory=list,
        description="Object keys to load (the sensor's manifest). Empty: every batch of the hour.",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        description="Payloads larger than this are rejected as oversized (not parsed).",
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
    with warehouse.connect() as conn:
        parameters = load_parameters(conn)
        devices = known_devices(conn)
        conn.commit()  # end the read, so each batch below is a transaction of its own
        batches = load_objects(
            conn,
            store,
            infos,
            run_id=context.run.run_id,
            parameters=parameters,
            devices=devices,
            max_payload_bytes=config.max_payload_bytes,
            ts_window=ts_window,
        )
        for n, (_decoded, load, _seconds) in enumerate(batches, 1):
            loads.append(load)
            if n % 25 == 0 or n == len(infos):
                context.log.info(f"loaded {n}/{len(infos)} batches")

    rejects: Counter[str] = Counter()
    for load in loads:
        rejects.update(load.rejects_by_reason)
    times = [t for load in loads for t in (load.min_ts, load.max_ts) if t is not None]
    common: dict[str, str | int | float] = {
        "batches": len(loads),
        "reloaded_batches": sum(load.reloaded for load in loads),
        "mode": mode,
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
