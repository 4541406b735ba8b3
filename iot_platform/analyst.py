"""Analysts' access to the raw messages: a Polars LazyFrame over a time range.

For each hour in the range it reads the compacted lake files named by the hour's manifest
plus every micro-batch the manifest does not hold (the still-open hour, or batches that
landed after the hour was compacted), so no message is missed or read twice
(``iot_platform.lake``). Only those files are opened: the key layout is the partition
pruning. Hive partitioning adds the ``date`` and ``hour`` columns. See docs/analysts.md.
"""

from __future__ import annotations

import datetime as dt

import polars as pl

from iot_platform.lake import device_id_expr, hour_files, hour_start
from iot_platform.objectstore import object_store_from_env
from iot_platform.settings import PlatformSettings, env_secret


def s3_storage_options(settings: PlatformSettings) -> dict[str, str]:
    """Polars/object_store options for the platform's S3/MinIO endpoint."""
    access, secret = env_secret("IOT_S3_ACCESS_KEY"), env_secret("IOT_S3_SECRET_KEY")
    scheme = "https" if settings.s3_secure else "http"
    return {
        "aws_endpoint_url": f"{scheme}://{settings.s3_endpoint}",
        "aws_access_key_id": access.value if access else "",
        "aws_secret_access_key": secret.value if secret else "",
        "aws_region": "us-east-1",
        "aws_allow_http": str(not settings.s3_secure).lower(),
    }


EMPTY_SCHEMA = pl.Schema(
    {
        "received_at": pl.Datetime("us", "UTC"),
        "topic": pl.Categorical(),
        "payload": pl.Binary(),
        "qos": pl.Int8(),
        "retain": pl.Boolean(),
        "device_id": pl.String(),
        "date": pl.Date(),
        "hour": pl.Int64(),
    }
)


def raw_messages(
    start: dt.datetime, end: dt.datetime, settings: PlatformSettings | None = None
) -> pl.LazyFrame:
    """Every raw MQTT message received in [start, end) as a LazyFrame (columns of DESIGN §5
    plus ``device_id``, ``date`` and ``hour``); ``payload`` is the undecoded bytes."""
    settings = settings or PlatformSettings.from_env()
    store = object_store_from_env(settings)
    parts: list[str] = []
    batches: list[str] = []
    hour = hour_start(start)
    while hour < end:
        files = hour_files(store, hour)
        parts += files.parts
        batches += files.batches
        hour += dt.timedelta(hours=1)
    if settings.object_store == "s3":
        options: dict[str, str] | None = s3_storage_options(settings)
        base = f"s3://{settings.s3_bucket}/"
    else:
        options, base = None, f"{settings.local_store_dir}/"

    def scan(keys: list[str]) -> pl.LazyFrame:
        sources = [base + key for key in keys]
        return pl.scan_parquet(sources, hive_partitioning=True, storage_options=options)

    frames = []
    if parts:  # the lake files carry device_id, sorted by it, with row-group statistics
        frames.append(scan(parts).select(EMPTY_SCHEMA.names()))
    if batches:
        frames.append(
            scan(batches).with_columns(device_id=device_id_expr()).select(EMPTY_SCHEMA.names())
        )
    if not frames:
        return pl.LazyFrame(schema=EMPTY_SCHEMA)
    window = (pl.col("received_at") >= start) & (pl.col("received_at") < end)
    return pl.concat(frames).filter(window)
