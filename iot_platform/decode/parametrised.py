"""The parametrised family (``{tele|stat|cmnd}/f2-{mac}/{mode}/{connector}/{component}``):
raw strings whose meaning (encoding, metric, unit, scale) comes from a ``device_parameters``
row per (device, mode, connector, component), not from the payload."""

from __future__ import annotations

from typing import Any

import polars as pl

from iot_platform.decode.collector import Collector, out_of_range, show
from iot_platform.decode.schema import MAX_ABS_VALUE, MAX_MEASUREMENTS, PARAMETER_ENCODINGS
from iot_platform.decode.schema import RejectReason as R

_BOOLEAN_WORDS = {"1": 1.0, "true": 1.0, "on": 1.0, "0": 0.0, "false": 0.0, "off": 0.0}


def prepare_parameters(parameters: pl.DataFrame | None) -> pl.DataFrame:
    """The ``device_parameters`` table in one shape (first row of a key wins, ``scale``
    defaults to 1), checked up front so a table lacking columns fails every call, not only
    the calls that happen to carry parametrised messages."""
    keys = ["device_id", "mode", "connector", "component"]
    if parameters is None:
        schema = dict.fromkeys([*keys, "encoding", "metric", "unit"], pl.String)
        return pl.DataFrame(schema={**schema, "scale": pl.Float64, "_param": pl.Boolean})
    missing = {*keys, "encoding", "metric"} - set(parameters.columns)
    if missing:
        raise ValueError(f"device_parameters lacks columns {sorted(missing)}")
    unit = pl.col("unit").cast(pl.String) if "unit" in parameters.columns else pl.lit(None)
    scale = pl.col("scale").cast(pl.Float64) if "scale" in parameters.columns else pl.lit(None)
    return (
        parameters.select(
            *[pl.col(k).cast(pl.String) for k in keys],
            pl.col("encoding").cast(pl.String),
            pl.col("metric").cast(pl.String),
            unit.cast(pl.String).alias("unit"),
            scale.cast(pl.Float64).fill_null(1.0).alias("scale"),
        )
        .unique(subset=keys, keep="first", maintain_order=True)
        .with_columns(_param=pl.lit(True))
    )


def decode_param(rows: pl.DataFrame, params: pl.DataFrame, out: Collector) -> None:
    rows = rows.join(
        params.rename({"device_id": "topic_device", "metric": "_metric"}),
        on=["topic_device", "mode", "connector", "component"],
        how="left",
        maintain_order="left",
    )
    enc = pl.col("encoding")
    text = pl.col("text").str.strip_chars(" \t\r\n")
    key = pl.format(
        "{} {}/{}/{}",
        pl.col("topic_device"),
        show(pl.col("mode")),
        show(pl.col("connector")),
        show(pl.col("component")),
    )
    hex32 = text.str.decode("hex", strict=False).bin.reinterpret(dtype=pl.Float32, endianness="big")
    hex64 = text.str.decode("hex", strict=False).bin.reinterpret(dtype=pl.Float64, endianness="big")
    rows = rows.with_columns(
        _t=text,
        _hex=(
            pl.when(text.str.contains(r"^[0-9A-Fa-f]{8}$"))
            .then(hex32.cast(pl.Float64))
            .when(text.str.contains(r"^[0-9A-Fa-f]{16}$"))
            .then(hex64)
            .otherwise(None)
        )
        * pl.col("scale"),
        _bool=text.str.to_lowercase().replace_strict(
            _BOOLEAN_WORDS, default=None, return_dtype=pl.Float64
        ),
    )
    t = pl.col("_t")
    checks: list[tuple[pl.Expr, Any, Any]] = [
        (
            pl.col("_param").is_null(),
            R.UNKNOWN_PARAMETER,
            pl.format("no device_parameters row for {}", key),
        ),
        (
            ~enc.is_in(PARAMETER_ENCODINGS) | pl.col("_metric").is_null(),
            R.UNKNOWN_PARAMETER,
            pl.format(
                "device_parameters row for {} has encoding '{}' / metric '{}'",
                key,
                show(enc),
                show(pl.col("_metric")),
            ),
        ),
        (
            (enc == "boolean") & pl.col("_bool").is_null(),
            R.WRONG_TYPE,
            pl.format("'{}' is not a boolean (1/0/true/false/on/off)", show(t)),
        ),
        (
            (enc == "boolean_map") & ~t.str.contains(r"^[01]+$"),
            R.WRONG_TYPE,
            pl.format("'{}' is not a boolean map of 0/1 characters", show(t)),
        ),
        (
            (enc == "boolean_map") & (t.str.len_bytes() > MAX_MEASUREMENTS),
            R.TOO_MANY_MEASUREMENTS,
            pl.format("{} positions, limit is {}", t.str.len_bytes(), pl.lit(MAX_MEASUREMENTS)),
        ),
        (
            (enc == "hex_to_float") & pl.col("_hex").is_null(),
            R.WRONG_TYPE,
            pl.format("'{}' is not 8 or 16 hex digits", show(t)),
        ),
        (
            (enc == "hex_to_float") & out_of_range(pl.col("_hex")),
            R.VALUE_OUT_OF_RANGE,
            pl.format(
                "value {} is NaN, infinite or beyond ±{}",
                pl.col("_hex"),
                pl.lit(f"{MAX_ABS_VALUE:g}"),
            ),
        ),
        (
            (enc == "raw_string") & pl.col("text").str.contains("\x00", literal=True),
            R.WRONG_TYPE,
            pl.lit("raw string contains a NUL character"),
        ),
    ]
    good = out.reject_where(rows, checks)
    common = {
        "device_id": pl.col("topic_device"),
        "unit": pl.col("unit"),
        "received_at": pl.col("received_at"),
        "ts": pl.col("received_at"),
    }
    scalar = good.filter(enc.is_in(["boolean", "hex_to_float"]))
    out.telemetry.append(
        scalar.select(
            "_row",
            _pos=pl.lit(0, pl.Int64),
            metric="_metric",
            value=pl.when(enc == "boolean").then(pl.col("_bool")).otherwise(pl.col("_hex")),
            **common,
        )
    )
    bitmap = good.filter(enc == "boolean_map")
    if bitmap.height:
        bits = (
            bitmap.with_columns(
                _bits=t.str.extract_all(r"[01]"),
            )
            .with_columns(_pos=pl.int_ranges(1, pl.col("_bits").list.len() + 1, dtype=pl.Int64))
            .explode("_bits", "_pos")
        )
        out.telemetry.append(
            bits.select(
                "_row",
                "_pos",
                metric=pl.format("{}_{}", pl.col("_metric"), pl.col("_pos")),
                value=pl.col("_bits").cast(pl.Float64),
                **common,
            )
        )
    raw = good.filter(enc == "raw_string")
    out.events.append(
        raw.select(
            "_row",
            ts="received_at",
            device_id="topic_device",
            msg_type=pl.lit("parameter"),
            seq=pl.lit(None, pl.Int64),
            body=pl.struct(metric=pl.col("_metric"), value=pl.col("text")).struct.json_encode(),
            received_at="received_at",
        )
    )
