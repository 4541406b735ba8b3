"""Jobs: the live load (sensor-driven) of raw batches through the rollups."""

from __future__ import annotations

import dagster as dg

from iot_platform.defs.keys import (
    DEVICE_EVENTS,
    TELEMETRY,
    TELEMETRY_1D,
    TELEMETRY_1H,
    TELEMETRY_1M,
)

load_job = dg.define_asset_job(
    name="load_raw_batches_job",
    # Without the device-health checks: they run in device_health_job at a fixed rate, so
    # no device-level finding can skip the rollups or slow the live path (defs/health/checks.py).
    selection=dg.AssetSelection.assets(
        TELEMETRY, DEVICE_EVENTS, TELEMETRY_1M, TELEMETRY_1H, TELEMETRY_1D
    ).without_checks(),
    description="Decode and load raw batches of one receive hour, then refresh the rollups.",
    # Loads are idempotent (the ledger), so a failed run is simply re-run from its failure.
    # A live run follows its hour (about an hour at most); one still running after two has
    # lost its worker and is ended by the run monitoring (deploy/dagster/dagster.yaml).
    tags={
        "dagster/max_retries": "3",
        "dagster/retry_strategy": "FROM_FAILURE",
        "dagster/max_runtime": "7200",
    },
)
