"""The raw micro-batches the ingest daemon writes: an external asset, observed, not computed.

The daemon (``ingest_daemon``) runs outside Dagster; this spec gives its output a node in
the lineage graph, so the warehouse load hangs below it and the sensor can report it.
"""

import dagster as dg

from iot_platform.defs.keys import RAW_BATCHES
from iot_platform.defs.partitions import hourly_partitions

raw_batches = dg.AssetSpec(
    key=RAW_BATCHES,
    group_name="ingest",
    partitions_def=hourly_partitions,
    kinds={"parquet", "s3"},
    description=(
        "Raw MQTT traffic as zstd Parquet micro-batches written by the ingest daemon under "
        "raw/v1/date=…/hour=…/ (DESIGN §5). External: observed by the raw batch sensor."
    ),
)
