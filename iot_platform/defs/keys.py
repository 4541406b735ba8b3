"""Asset keys shared by assets, checks, sensors and dbt sources (one lineage graph)."""

from __future__ import annotations

import dagster as dg

RAW_BATCHES = dg.AssetKey(["raw", "raw_batches"])
TELEMETRY = dg.AssetKey(["warehouse", "telemetry"])
DEVICE_EVENTS = dg.AssetKey(["warehouse", "device_events"])
TELEMETRY_1M = dg.AssetKey(["warehouse", "telemetry_1m"])
TELEMETRY_1H = dg.AssetKey(["warehouse", "telemetry_1h"])
TELEMETRY_1D = dg.AssetKey(["warehouse", "telemetry_1d"])
DEVICE_CERTIFICATES = dg.AssetKey(["pki", "device_certificates"])
CRL = dg.AssetKey(["pki", "crl"])
