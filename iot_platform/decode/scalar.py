"""The scalar family (``devices/{id}/{metric}``): the payload is a bare number, read at
receive time (the topic names the metric; there is no device time, unit or seq)."""

from __future__ import annotations

from typing import Any

import polars as pl

from iot_platform.decode.collector import Collector, out_of_range, show
from iot_platform.decode.schema import MAX_ABS_VALUE
from iot_platform.decode.schema import RejectReason as R

_NUMBER_PATTERN = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
_NONFINITE_PATTERN = r"(?i)^[+-]?(?:nan|inf|infinity)$"


def decode_scalar(rows: pl.DataFrame, out: Collector) -> None:
    text = pl.col("text").str.strip_chars(" \t\r\n")
    rows = rows.with_columns(_t=text).with_columns(
        _value=pl.when(pl.col("_t").str.contains(_NUMBER_PATTERN)).then(
            pl.col("_t").cast(pl.Float64, strict=False)
        )
    )
    checks: list[tuple[pl.Expr, Any, Any]] = [
        (
            pl.col("_t").str.contains(_NONFINITE_PATTERN),
            R.VALUE_OUT_OF_RANGE,
            pl.format("value '{}' is not finite", show(pl.col("_t"))),
        ),
        (
            pl.col("_value").is_null(),
            R.WRONG_TYPE,
            pl.format("payload '{}' is not a number", show(pl.col("_t"))),
        ),
        (
            out_of_range(pl.col("_value")),
            R.VALUE_OUT_OF_RANGE,
            pl.format(
                "value {} is beyond ±{}",
                pl.col("_t").str.slice(0, 64),
                pl.lit(f"{MAX_ABS_VALUE:g}"),
            ),
        ),
    ]
    good = out.reject_where(rows, checks)
    out.telemetry.append(
        good.select(
            "_row",
            _pos=pl.lit(0, pl.Int64),
            ts="received_at",
            device_id="topic_device",
            metric="metric",
            value="_value",
            unit=pl.lit(None, pl.String),
            received_at="received_at",
        )
    )
