"""The compacted raw lake: hourly compaction of the raw micro-batches (asset, sensor) and
the micro-batches' retention pass (asset, schedule). The logic is ``iot_platform.lake``."""
