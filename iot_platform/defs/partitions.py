"""Receive-hour partitions, matching the raw batch keys' ``date=/hour=`` (DESIGN §5, §7)."""

from __future__ import annotations

import dagster as dg

# end_offset=1: the current, still-filling hour is a valid partition, so the sensor can
# load batches seconds after they land instead of waiting for the hour to close.
hourly_partitions = dg.HourlyPartitionsDefinition(
    start_date="2025-01-01-00:00", timezone="UTC", end_offset=1
)
