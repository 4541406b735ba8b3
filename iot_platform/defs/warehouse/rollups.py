"""``telemetry_1m`` -> ``telemetry_1h`` -> ``telemetry_1d``: refresh the window a run touched.

The window comes from the ledger: the ``ts`` range (old and new rows) of the batches this
run loaded that its load step has not refreshed already, or — when an aggregate is
materialised on its own — of every batch of the partition's hour. Nothing touched,
nothing refreshed.

The last rollup's step marks the run's batches refreshed (``rollups_refreshed_at``), as
the load step's refreshes do: the health rule ``values_out_of_range`` reads the minute
rollup for marked batches and raw telemetry for the rest, so a backfill or a manifest-only
run (no refresh beside its load) must not leave its batches unmarked.
"""

import time

import dagster as dg

from iot_platform.defs.keys import TELEMETRY, TELEMETRY_1D, TELEMETRY_1H, TELEMETRY_1M
from iot_platform.defs.partitions import hourly_partitions
from iot_platform.defs.resources import WarehouseResource
from iot_platform.defs.warehouse.retry import LOAD_RETRY
from iot_platform.warehouse.aggregates import mark_refreshed, refresh, unrefreshed_window

ROLLUP_KEYS = (TELEMETRY_1M, TELEMETRY_1H, TELEMETRY_1D)  # in refresh order


def touched_window(conn, run_id: str, partition_key: str):
    """(from, to, batch ids) to refresh: what this run loaded and its load step has not
    refreshed already (a following run refreshes beside its load, ``refresh_loaded``), with
    those batches' ids; when the run loaded nothing (an aggregate materialised on its own,
    a retry of the rollup steps), every batch of the partition's hour, and no ids: another
    run may be loading into that hour, and a batch it commits between the minute rollup's
    step and the last one's would be marked without being in the minute rollup."""
    loaded = conn.execute(
        "SELECT EXISTS (SELECT FROM ingest_batches WHERE dagster_run_id = %s)", [run_id]
    ).fetchone()[0]
    if loaded:
        return unrefreshed_window(conn, run_id)
    row = conn.execute(
        "SELECT min(refresh_from), max(refresh_to) FROM ingest_batches WHERE partition_key = %s",
        [partition_key],
    ).fetchone()
    return (row[0], row[1], []) if row and row[0] is not None else None


def _earlier_rollups_ran(context: dg.AssetExecutionContext) -> bool:
    """Whether this run materialised every rollup before the last one: a run of a subset
    chosen in the UI (the load and telemetry_1d, say) did not refresh the others, and its
    batches must stay unmarked."""
    done = {
        entry.dagster_event.asset_key
        for entry in context.instance.all_logs(
            context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        )
        if entry.dagster_event is not None
    }
    return set(ROLLUP_KEYS[:-1]) <= done


def rollup_asset(key: dg.AssetKey, upstream: dg.AssetKey) -> dg.AssetsDefinition:
    name = key.path[-1]
    last = key == ROLLUP_KEYS[-1]  # the batches are marked once every rollup covers them

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
            start, end, batch_ids = window
            lo, hi = refresh(conn, dialect, name, start, end)
            marked = (
                mark_refreshed(conn, context.run.run_id, batch_ids)
                if last and _earlier_rollups_ran(context)
                else 0
            )
        return dg.MaterializeResult(
            metadata={
                "refreshed": True,
                "dialect": dialect.value,
                "window_start": str(lo),
                "window_end": str(hi),
                "batches_marked_refreshed": marked,
                "duration_s": round(time.monotonic() - started, 3),
            }
        )

    return _refresh


telemetry_1m = rollup_asset(TELEMETRY_1M, TELEMETRY)
telemetry_1h = rollup_asset(TELEMETRY_1H, TELEMETRY_1M)
telemetry_1d = rollup_asset(TELEMETRY_1D, TELEMETRY_1H)
