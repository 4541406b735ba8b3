"""MQTT -> raw Parquet micro-batches -> object store. Imports no Dagster (DESIGN §2)."""
