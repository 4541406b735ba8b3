"""``telemetry_1m`` -> ``telemetry_1h`` -> ``telemetry_1d``: refresh the window a run touched.

The window comes from the ledger: the ``ts`` range (old and new rows) of the batches this
run loaded that its load step has not refreshed already, or — when an aggregate is
materialised on its own — of every batch of the partition's hour. Nothing touched,
nothing refreshed.
"""

import time

import dagster as dg

from iot_platform.defs.keys import TELEMETRY, TELEMETRY_1D, TELEMETRY_1H, TELEMETRY_1M
from iot_platform.defs.partitions import hourly_partitions
from iot_platform.defs.resources import WarehouseResource
from iot_platform.defs.warehouse.retry import LOAD_RETRY
from iot_platform.warehouse.aggregates import refresh, unrefreshed_window


def touched_window(conn, run_id: str, partition_key: str):
    """(from, to) to refresh: what this run loaded and its load step has not refreshed
    already (a following run refreshes beside its load, ``refresh_loaded``); when the run
    loaded nothing (an aggregate materialised on its own, a retry of the rollup steps),
    every batch of the partition's hour."""
    loaded = conn.execute(
        "SELECT EXISTS (SELECT FROM ingest_batches WHERE dagster_run_id = %s)", [run_id]
    ).fetchone()[0]
    if loaded:
        window = unrefreshed_window(conn, run_id)
        return None if window is None else window[:2]
    row = conn.execute(
        "SELECT min(refresh_from), max(refresh_to) FROM ingest_batches WHERE partition_key = %s",
        [partition_key],
    ).fetchone()
    return row if row and row[0] is not None else None


def rollup_asset(key: dg.AssetKey, upstream: dg.AssetKey) -> dg.AssetsDefinition:
    name = key.path[-1]

    @dg.asset(
        key=key,
        deps=[upstream],
        partitions_def=hourly_partitions,
        group_name="aggregates",
        kinds={"timescaledb", "postgres"},
        retry_policy=LOAD_RETRY,
        description=f"Rollup {name}: count, sum, avg, min, max, first, last per device and metric.",
    )
    def _refresh(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        started = time.monotonic()
        dialect = warehouse.dialect()
        with warehouse.connect(autocommit=True) as conn:
            window = touched_window(conn, context.run.run_id, context.partition_key)
            if window is None:
                return dg.MaterializeResult(
                    metadata={"refreshed": False, "reason": "nothing left to refresh"}
                )
            lo, hi = refresh(conn, dialect, name, *window)
        return dg.MaterializeResult(
            metadata={
                "refreshed": True,
                "dialect": dialect.value,
                "window_start": str(lo),
                "window_end": str(hi),
                "duration_s": round(time.monotonic() - started, 3),
            }
        )

    return _refresh


telemetry_1m = rollup_asset(TELEMETRY_1M, TELEMETRY)
telemetry_1h = rollup_asset(TELEMETRY_1H, TELEMETRY_1M)
telemetry_1d = rollup_asset(TELEMETRY_1D, TELEMETRY_1H)
