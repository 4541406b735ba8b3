"""Analysts' access to the raw batches: a Polars LazyFrame over a time range.

It lists the batch objects of the hours in the range through the object store interface
(so only those files are opened: the key layout is the partition pruning) and scans them
with hive partitioning, adding the ``date`` and ``hour`` columns. See docs/analysts.md.
"""

from __future__ import annotations

import datetime as dt

import polars as pl

from iot_platform.objectstore import object_store_from_env
from iot_platform.rawbatch import hour_prefix
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


def raw_messages(
    start: dt.datetime, end: dt.datetime, settings: PlatformSettings | None = None
) -> pl.LazyFrame:
    """Every raw MQTT message received in [start, end) as a LazyFrame (columns of DESIGN §5
    plus ``date`` and ``hour``); ``payload`` is the undecoded bytes."""
    settings = settings or PlatformSettings.from_env()
    store = object_store_from_env(settings)
    hour = start.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    keys: list[str] = []
    while hour < end:
        keys += [info.key for info in store.list(hour_prefix(hour))]
        hour += dt.timedelta(hours=1)
    window = (pl.col("received_at") >= start) & (pl.col("received_at") < end)
    if not keys:
        return pl.LazyFrame(
            schema={
                "received_at": pl.Datetime("us", "UTC"),
                "topic": pl.Categorical,
                "payload": pl.Binary,
                "qos": pl.Int8,
                "retain": pl.Boolean,
                "date": pl.Date,
                "hour": pl.Int64,
            }
        )
    if settings.object_store == "s3":
        sources = [f"s3://{settings.s3_bucket}/{key}" for key in keys]
        options = s3_storage_options(settings)
    else:
        sources = [str(settings.local_store_dir / key) for key in keys]
        options = None
    return pl.scan_parquet(sources, hive_partitioning=True, storage_options=options).filter(window)
