"""Everything decided before a payload is parsed: the raw rows in one shape and order, each
topic's family and device id, and the size, registry, empty-payload and UTF-8 checks that
apply to every family alike (the first steps of the documented check order)."""

from __future__ import annotations

from collections.abc import Collection

import polars as pl
import pyarrow as pa

from iot_platform.decode.collector import Collector
from iot_platform.decode.json_engine import PARSE_ERRORS, isolate_failures
from iot_platform.decode.schema import (
    METRIC_PATTERN,
    PARAM_DEVICE_ID_PATTERN,
    UTC_US,
)
from iot_platform.decode.schema import RejectReason as R
from iot_platform.device_ids import DEVICE_ID_REGEX
from iot_platform.topics import routing_pattern, v2_kinds

_TOPIC_KINDS = v2_kinds()


def prepare(raw: pa.Table | pl.DataFrame) -> pl.DataFrame:
    """The raw rows as ``received_at, topic, payload, retain``, ordered by receive time
    (stable) and numbered ``_row``: the key every verdict is collected under."""
    frame = raw if isinstance(raw, pl.DataFrame) else pl.from_arrow(raw)
    if not isinstance(frame, pl.DataFrame):
        raise TypeError("decode_raw expects a pyarrow Table or a polars DataFrame")
    missing = {"received_at", "topic", "payload"} - set(frame.columns)
    if missing:
        raise ValueError(f"raw rows lack columns {sorted(missing)}")
    retain = pl.col("retain").cast(pl.Boolean) if "retain" in frame.columns else pl.lit(False)
    return (
        frame.select(
            pl.col("received_at").cast(UTC_US),
            pl.col("topic").cast(pl.String).fill_null(""),
            pl.col("payload").cast(pl.Binary).fill_null(b""),
            retain.fill_null(False).alias("retain"),
        )
        .sort("received_at", maintain_order=True, nulls_last=True)
        .with_row_index("_row")
        .with_columns(pl.col("_row").cast(pl.Int64))
    )


def _classify_topics(topics: pl.Series) -> pl.DataFrame:
    v2, scalar, param = (routing_pattern(family) for family in ("v2", "scalar", "param"))
    topic = pl.col("topic")
    family = (
        pl.when(topic.str.contains(v2))
        .then(pl.lit("v2"))
        .when(topic.str.contains(scalar))
        .then(pl.lit("scalar"))
        .when(topic.str.contains(param))
        .then(pl.lit("param"))
    )
    frame = pl.DataFrame({"topic": topics}).with_columns(family=family)
    fam = pl.col("family")
    device = (
        pl.when(fam == "v2")
        .then(topic.str.extract(v2, 1))
        .when(fam == "scalar")
        .then(topic.str.extract(scalar, 1))
        .when(fam == "param")
        .then(topic.str.extract(param, 1))
    )
    pattern_ok = (
        pl.when(fam == "param")
        .then(device.str.contains(PARAM_DEVICE_ID_PATTERN))
        .otherwise(device.str.contains(DEVICE_ID_REGEX))
    )
    return frame.with_columns(
        topic_device=device,
        device_ok=pattern_ok.fill_null(False),
        kind=topic.str.extract(v2, 2).replace_strict(_TOPIC_KINDS, default=None),
        metric=topic.str.extract(scalar, 2),
        mode=topic.str.extract(param, 2),
        connector=topic.str.extract(param, 3),
        component=topic.str.extract(param, 4),
    )


def screen(
    base: pl.DataFrame,
    out: Collector,
    max_payload_bytes: int,
    known_devices: Collection[str] | None,
) -> pl.DataFrame:
    """Size, topic family, topic device id, empty payloads: no payload parsing yet."""
    topics = _classify_topics(base.get_column("topic").unique(maintain_order=True))
    rows = base.join(topics, on="topic", how="left", maintain_order="left").with_columns(
        size=pl.col("payload").bin.size()
    )
    size, fam = pl.col("size"), pl.col("family")
    blank = pl.col("payload").bin.size() == 0
    # an empty payload on status is "clear retained": ignored, not rejected
    ignored = (pl.col("kind") == "status") & blank & (size <= max_payload_bytes)
    rows = rows.filter(~ignored.fill_null(False))
    show_topic = pl.col("topic").str.slice(0, 80)
    checks = [
        (
            size > max_payload_bytes,
            R.OVERSIZED,
            pl.format("payload is {} bytes, limit is {}", size, pl.lit(max_payload_bytes)),
        ),
        (
            fam.is_null(),
            R.UNKNOWN_FAMILY,
            pl.format("topic '{}' is not a supported topic family", show_topic),
        ),
        (
            ~pl.col("device_ok"),
            R.INVALID_DEVICE_ID,
            pl.format(
                "device id '{}' in the topic is not a valid device id",
                pl.col("topic_device").str.slice(0, 80),
            ),
        ),
        (
            pl.lit(known_devices is not None)
            & ~pl.col("topic_device").is_in(
                pl.Series(list(known_devices or ()), dtype=pl.String).implode()
            ),
            R.UNKNOWN_DEVICE,
            pl.format(
                "device '{}' is not registered (enroll it, then backfill)", pl.col("topic_device")
            ),
        ),
        (
            (fam == "scalar") & ~pl.col("metric").str.contains(METRIC_PATTERN),
            R.WRONG_TYPE,
            pl.format(
                "metric '{}' in the topic does not match {}",
                pl.col("metric").str.slice(0, 80),
                pl.lit(METRIC_PATTERN),
            ),
        ),
        (
            (fam == "v2") & blank,
            R.MALFORMED_JSON,
            pl.lit("empty payload"),
        ),
    ]
    return out.reject_where(rows, checks)


def to_text(rows: pl.DataFrame, out: Collector) -> pl.DataFrame:
    """Decode payloads as UTF-8 (vectorised; bisection isolates invalid rows)."""
    payload = rows.get_column("payload")
    try:
        text = payload.cast(pl.String)
    except PARSE_ERRORS:
        bad = isolate_failures(payload, _utf8_ok)
        invalid = pl.int_range(pl.len(), dtype=pl.Int64).is_in(bad)
        rows = rows.with_columns(_bad=invalid)
        checks = [
            (
                pl.col("_bad") & (pl.col("family") == "v2"),
                R.MALFORMED_JSON,
                pl.lit("payload is not valid UTF-8"),
            ),
            (pl.col("_bad"), R.WRONG_TYPE, pl.lit("payload is not valid UTF-8 text")),
        ]
        rows = out.reject_where(rows, checks).drop("_bad")
        text = rows.get_column("payload").cast(pl.String)
    return rows.with_columns(text=text)


def _utf8_ok(part: pl.Series) -> bool:
    try:
        part.cast(pl.String)
    except PARSE_ERRORS:
        return False
    return True
