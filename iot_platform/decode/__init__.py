"""Decode raw MQTT rows (DESIGN §5) into warehouse rows (DESIGN §6), vectorised.

``decode_raw`` is pure: raw rows in, four frames and a duplicate count out. Bad input is
never raised; every message is decoded, ignored (see below) or rejected with a reason.

How JSON is parsed
------------------
All v2 payloads of one kind are parsed together by Arrow's JSON reader with an explicit,
strict schema (a string where a number belongs, a float where an integer belongs, a
boolean anywhere typed, ... fail the parse). Each payload is wrapped as
``{"_i":N,"p":<payload>}`` so output rows provably line up with input rows, and the plain
newline-joined payloads are parsed once more to prove each payload is exactly one JSON
value (no trailing garbage). Event payloads are stored as ``jsonb`` bodies, so they are
additionally held to Polars' strict parser (no NaN/Infinity) and may not contain
``\\u0000``. Only when a parse fails is the input split into 16 parts and parsed again;
the rows of parts that still fail are examined one by one with ``json.loads`` (the slow
path) and either rejected outright (bad syntax, not an object, duplicate keys) or
*repaired*: rebuilt from the fields the decoder reads, a field of the wrong JSON type
nulled and remembered as a pre-classified issue. Repaired rows go back through the
vectorised path, which applies the one ordered list of checks to every row. So a
well-formed batch never touches Python per row, and a batch full of bad rows costs one
``json.loads`` per row rather than a re-parse per bisection level.

Rules decided here (beyond DESIGN §4)
-------------------------------------
* Check order per message: oversized (before any parsing), unknown family, invalid
  device id (topic), empty payload, UTF-8, JSON syntax, then per envelope field in the
  order v, device_id, ts (format, then plausibility), seq, msg_type,
  measurements|status; the first failure wins.
* A bad measurement drops only that measurement; the good ones of the message are kept.
  The message gets ONE reject row: reason of its first bad measurement, detail listing
  them (``measurements[3].val is a string, expected a number``), the message excerpt.
* NaN/Infinity: the ``NaN``, ``Infinity``, ``-Infinity`` literals (and numbers that
  overflow a double, e.g. ``1e400``) are read as numbers in telemetry: in a measurement
  ``val`` they make that measurement value_out_of_range, in ``seq``/``v`` they are
  wrong_type, in fields the decoder does not read they are ignored. In an event payload
  (hello/status/ack/ota), which is kept verbatim as a jsonb body, they are malformed_json
  wherever they are. ``nan``/``inf`` as a scalar payload are value_out_of_range.
* Duplicate keys: an event payload (stored verbatim as jsonb, which would silently keep
  the last value) with a key twice in any object is malformed_json. In telemetry a
  duplicated field the decoder reads (envelope or measurement) is malformed_json;
  duplicates among unread fields are ignored like the rest of them. The verdict is the
  same on the vectorised and the slow path.
* Huge numbers: an integer literal too long for Python's ``int()`` is treated as an
  integer beyond every range (a ``val`` is value_out_of_range for that measurement only,
  a ``seq`` value_out_of_range), never Python's own error text for the whole message. In
  event bodies an integer that overflows a double is malformed_json, like ``1e400``.
* Integers: ``seq`` must be a JSON integer 0..2^32-1 (1.0, 1e3, "1", true are wrong_type;
  negative or larger is value_out_of_range). ``v`` must be the integer 2.
* ``ts``: ISO 8601 / RFC 3339 date-time ``YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|±HH[:]MM]``;
  without an offset it is taken as UTC; anything else is wrong_type.
* Device time is checked against receive time (``TsWindow``): an envelope or measurement
  ``ts`` more than ``ahead`` after ``received_at`` or more than ``age`` before it is
  ts_out_of_range (the value and both bounds in the detail), so no single message can
  stretch a rollup refresh window to 1970 or 9999. A status (last will) carries the
  device's connect time, which may be arbitrarily old: for status only ``ahead`` applies
  (presence is ordered by receive time). A leap second (``23:59:60``) is
  ts_out_of_range: timestamps here cannot represent it, and turning it silently into the
  next minute would reorder readings.
* Metric names (measurement ``type``, the ``devices/{id}/{metric}`` topic level) must match
  ``METRIC_PATTERN`` and units ``UNIT_PATTERN``, else wrong_type: they land in text columns
  analysts group by, so control characters and kilobyte names are refused.
* ``msg_type`` on a telemetry topic must be absent or "telemetry"; on event topics it
  must match ``MSG_TYPE_PATTERN``. ``status`` must be "online" or "offline".
* ``seq`` is required on telemetry, hello, command/ack and ota/status, optional on status.
* An empty (zero-byte) payload on ``iot/{id}/status`` is the MQTT "clear retained" and is
  ignored whatever its retain flag (brokers forward the clear to live subscribers with
  retain=0); other empty or whitespace-only payloads are rejected.
* Parametrised topics: the device id must be exactly ``f2-`` + 12 hex digits (matched
  case-sensitively against ``device_parameters``; another id on a 5-level
  tele/stat/cmnd topic is invalid_device_id). Payloads are stripped of surrounding
  whitespace except for raw_string. ``scale`` applies to hex_to_float only (booleans
  stay 0/1). A boolean_map longer than MAX_MEASUREMENTS is too_many_measurements.
  Duplicate ``device_parameters`` keys: the first row wins.
* De-duplication: accepted telemetry envelopes on (device_id, seq), first received wins
  (telemetry rows carry their envelope's seq, so the loader applies the same rule across
  batches: first stored wins, ``iot_platform.warehouse.load``);
  then all telemetry rows on (device_id, metric, ts), first wins; events on
  (device_id, msg_type, seq, ts, body). ``duplicates`` counts telemetry and event rows
  dropped. ``messages`` is NOT de-duplicated: it is the evidence for the seq
  gap/duplicate checks. Measurement rejects of a dropped duplicate envelope are not
  repeated.
* Output order: stable by received_at, then input position, then measurement position.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.json as pajson
from polars.datatypes import DataTypeClass

from iot_platform.device_ids import DEVICE_ID_REGEX
from iot_platform.topics import routing_pattern, v2_kinds

PARAM_DEVICE_ID_PATTERN = r"^f2-[0-9A-Fa-f]{12}$"
METRIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
UNIT_PATTERN = r"^[^\x00-\x1f\x7f]{0,32}$"
MSG_TYPE_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
MAX_MEASUREMENTS = 200
MAX_ABS_VALUE = 1e12
MAX_SEQ = 2**32 - 1
EXCERPT_BYTES = 256
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
PARAMETER_ENCODINGS = ("boolean", "boolean_map", "hex_to_float", "raw_string")

UTC_US = pl.Datetime("us", "UTC")


def _schema(columns: dict[str, pl.DataType | DataTypeClass]) -> pl.Schema:
    """A schema whose columns mix dtype instances (UTC_US) and classes (pl.String)."""
    return pl.Schema(columns)


TELEMETRY_SCHEMA = _schema(
    {
        "ts": UTC_US,
        "device_id": pl.String,
        "metric": pl.String,
        "value": pl.Float64,
        "unit": pl.String,
        "received_at": UTC_US,
        "seq": pl.Int64,  # the v2 envelope's (cross-batch de-duplication); null otherwise
    }
)
MESSAGES_SCHEMA = _schema(
    {
        "device_id": pl.String,
        "seq": pl.Int64,
        "ts": UTC_US,
        "received_at": UTC_US,
        "msg_type": pl.String,
    }
)
EVENTS_SCHEMA = _schema(
    {
        "ts": UTC_US,
        "device_id": pl.String,
        "msg_type": pl.String,
        "seq": pl.Int64,
        "body": pl.String,
        "received_at": UTC_US,
    }
)
REJECTS_SCHEMA = _schema(
    {
        "received_at": UTC_US,
        "topic": pl.String,
        "reason": pl.String,
        "detail": pl.String,
        "payload_excerpt": pl.String,
    }
)


class RejectReason(StrEnum):
    MALFORMED_JSON = "malformed_json"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FAMILY = "unknown_family"
    UNKNOWN_PARAMETER = "unknown_parameter"
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    INVALID_DEVICE_ID = "invalid_device_id"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    OVERSIZED = "oversized"
    TOO_MANY_MEASUREMENTS = "too_many_measurements"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DEVICE = "unknown_device"
    TS_OUT_OF_RANGE = "ts_out_of_range"


R = RejectReason


@dataclass(frozen=True)
class TsWindow:
    """How far device time may be from receive time: at most ``ahead`` after it, at most
    ``age`` before it (settings IOT_TS_MAX_AHEAD_S / IOT_TS_MAX_AGE_S). ``age`` is also
    how long a telemetry (device_id, seq) stays claimed by the first message stored."""

    ahead: dt.timedelta = dt.timedelta(days=1)
    age: dt.timedelta = dt.timedelta(days=7)


DEFAULT_TS_WINDOW = TsWindow()


@dataclass(frozen=True)
class DecodedFrames:
    telemetry: pl.DataFrame  # ts, device_id, metric, value, unit, received_at, seq
    messages: pl.DataFrame  # device_id, seq, ts, received_at, msg_type
    events: pl.DataFrame  # ts, device_id, msg_type, seq, body, received_at
    rejects: pl.DataFrame  # received_at, topic, reason, detail, payload_excerpt
    duplicates: int


# ---- v2 envelope field specs: the single source for the Arrow schema and diagnosis ----
_INT, _STR, _NUM, _LIST = "integer", "string", "number", "list"
_ENVELOPE: tuple[tuple[str, str], ...] = (
    ("v", _INT),
    ("device_id", _STR),
    ("ts", _STR),
    ("seq", _INT),
    ("msg_type", _STR),
)
_MEASUREMENT: tuple[tuple[str, str], ...] = (
    ("type", _STR),
    ("val", _NUM),
    ("ts", _STR),
    ("unit", _STR),
)
_GROUP_SPECS: dict[str, tuple[tuple[str, str], ...]] = {
    "telemetry": (*_ENVELOPE, ("measurements", _LIST)),
    "status": (*_ENVELOPE, ("status", _STR)),
    "event": _ENVELOPE,
}
_TOPIC_KINDS = v2_kinds()
_SELF = "_self"  # pseudo field: the envelope / measurement itself (JSON null, not an object)
_ARROW_KIND = {_INT: pa.int64(), _STR: pa.string(), _NUM: pa.float64()}


def _arrow_type(kind: str) -> pa.DataType:
    if kind == _LIST:
        return pa.list_(pa.struct([(f, _ARROW_KIND[k]) for f, k in _MEASUREMENT]))
    return _ARROW_KIND[kind]


def _wrapped_schema(group: str) -> pa.Schema:
    payload = pa.struct([(f, _arrow_type(k)) for f, k in _GROUP_SPECS[group]])
    return pa.schema([("_i", pa.int64()), ("p", payload)])


_WRAPPED_SCHEMAS = {group: _wrapped_schema(group) for group in _GROUP_SPECS}
_EMPTY_SCHEMA = pa.schema([])
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    pl.exceptions.PolarsError,
    pl.exceptions.PanicException,
)
_PARSE_CHUNK_BYTES = 32 * 1024 * 1024
_ISOLATE_LEAF = 8
_SPLIT_PARTS = 16
_MAX_FLOAT_INT = 2**1023  # ints at or beyond this overflow a double (treated as infinite)
_SPLIT_MIN_ROWS = 256
_NUL_ESCAPE = r"(?:^|[^\\])(?:\\\\)*\\u0000"
_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:?\d{2})?$"
_LEAP_SECOND = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:60"
_NUMBER_PATTERN = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
_NONFINITE_PATTERN = r"(?i)^[+-]?(?:nan|inf|infinity)$"
_BOOLEAN_WORDS = {"1": 1.0, "true": 1.0, "on": 1.0, "0": 0.0, "false": 0.0, "off": 0.0}


# ======================================================================================
# public entry point
# ======================================================================================
def decode_raw(
    raw: pa.Table | pl.DataFrame,
    parameters: pl.DataFrame | None = None,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    known_devices: Collection[str] | None = None,
    ts_window: TsWindow = DEFAULT_TS_WINDOW,
) -> DecodedFrames:
    """Decode raw MQTT rows (RAW_SCHEMA columns: received_at, topic, payload[, qos,
    retain]) into telemetry, messages, events and rejects (see the module docstring).

    ``parameters`` is the ``device_parameters`` table (device_id, mode, connector,
    component, encoding, metric[, unit, scale]); without it every parametrised message is
    unknown_parameter. ``known_devices`` is the device registry: when given, messages
    from a well-formed device id outside it are unknown_device (kept in the raw batch, so
    a backfill after enrolling the device recovers them). ``ts_window`` bounds device
    time relative to receive time. Raises only on programming errors (missing columns,
    wrong types)."""
    base = _prepare(raw)
    params = _prepare_parameters(parameters)
    out = _Collector(base)
    if base.height:
        rows = _screen(base, out, max_payload_bytes, known_devices)
        rows = _to_text(rows, out)
        v2 = rows.filter(pl.col("family") == "v2")
        if v2.height:
            _decode_v2(v2, out, ts_window)
        scalar = rows.filter(pl.col("family") == "scalar")
        if scalar.height:
            _decode_scalar(scalar, out)
        param = rows.filter(pl.col("family") == "param")
        if param.height:
            _decode_param(param, params, out)
    return out.finish()


# ======================================================================================
# input preparation and screening
# ======================================================================================
def _prepare(raw: pa.Table | pl.DataFrame) -> pl.DataFrame:
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


def _prepare_parameters(parameters: pl.DataFrame | None) -> pl.DataFrame:
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


def _screen(
    base: pl.DataFrame,
    out: _Collector,
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


def _to_text(rows: pl.DataFrame, out: _Collector) -> pl.DataFrame:
    """Decode payloads as UTF-8 (vectorised; bisection isolates invalid rows)."""
    payload = rows.get_column("payload")
    try:
        text = payload.cast(pl.String)
    except _PARSE_ERRORS:
        bad = _isolate_failures(payload, _utf8_ok)
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
    except _PARSE_ERRORS:
        return False
    return True


def _isolate_failures(series: pl.Series, ok: Callable[[pl.Series], bool]) -> list[int]:
    """Positions of the rows for which ``ok`` fails, found by bisection."""
    return [lo for lo, _ in _bisect(series.len(), lambda lo, hi: ok(series.slice(lo, hi - lo)))[1]]


def _bisect(
    n: int, attempt: Callable[[int, int], Any]
) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """Run ``attempt(lo, hi)`` on [0, n); where it fails (returns a falsy value or a
    ``(None, why)`` pair) split the range, down to single rows. Returns the successful
    ``[(lo, result)]`` and the failing single rows ``[(position, why)]``."""
    good: list[tuple[int, Any]] = []
    bad: list[tuple[int, Any]] = []
    stack = [(0, n)] if n else []
    while stack:
        lo, hi = stack.pop()
        result = attempt(lo, hi)
        failed = not result or (isinstance(result, tuple) and result[0] is None)
        if not failed:
            good.append((lo, result))
        elif hi - lo == 1:
            bad.append((lo, result[1] if isinstance(result, tuple) else ""))
        elif hi - lo <= _ISOLATE_LEAF:
            stack.extend((i, i + 1) for i in reversed(range(lo, hi)))
        else:
            mid = (lo + hi) // 2
            stack.extend(((mid, hi), (lo, mid)))
    return good, sorted(bad)


# ======================================================================================
# result collection
# ======================================================================================
class _Collector:
    def __init__(self, base: pl.DataFrame) -> None:
        self.base = base
        self.rejects: list[pl.DataFrame] = []
        self.telemetry: list[pl.DataFrame] = []
        self.events: list[pl.DataFrame] = []
        self.messages: list[pl.DataFrame] = []
        self.duplicates = 0

    def reject(self, frame: pl.DataFrame) -> None:
        """``frame``: _row, reason, detail."""
        if frame.height:
            self.rejects.append(
                frame.select(
                    pl.col("_row").cast(pl.Int64),
                    pl.col("reason").cast(pl.String),
                    pl.col("detail").cast(pl.String),
                )
            )

    def reject_where(
        self, rows: pl.DataFrame, checks: Sequence[tuple[pl.Expr, str, pl.Expr]]
    ) -> pl.DataFrame:
        """Reject rows by the first failing check; return the rows that pass them all."""
        reason, detail = _first_failure(checks)
        flagged = rows.with_columns(_reason=reason, _detail=detail)
        self.reject(
            flagged.filter(pl.col("_reason").is_not_null()).select(
                "_row", reason="_reason", detail="_detail"
            )
        )
        return flagged.filter(pl.col("_reason").is_null()).drop("_reason", "_detail")

    def finish(self) -> DecodedFrames:
        telemetry = _concat(
            self.telemetry, {"_row": pl.Int64, "_pos": pl.Int64, **TELEMETRY_SCHEMA}
        )
        telemetry = telemetry.sort("_row", "_pos", maintain_order=True)
        before = telemetry.height
        telemetry = telemetry.unique(
            subset=["device_id", "metric", "ts"], keep="first", maintain_order=True
        )
        self.duplicates += before - telemetry.height

        events = _concat(self.events, {"_row": pl.Int64, **EVENTS_SCHEMA}).sort(
            "_row", maintain_order=True
        )
        before = events.height
        events = events.unique(
            subset=["device_id", "msg_type", "seq", "ts", "body"], keep="first", maintain_order=True
        )
        self.duplicates += before - events.height

        messages = _concat(self.messages, {"_row": pl.Int64, **MESSAGES_SCHEMA}).sort(
            "_row", maintain_order=True
        )
        rejects = _concat(
            self.rejects, {"_row": pl.Int64, "reason": pl.String, "detail": pl.String}
        ).sort("_row", maintain_order=True)
        rejects = self._reject_rows(rejects)
        return DecodedFrames(
            telemetry=telemetry.select(TELEMETRY_SCHEMA.names()),
            messages=messages.select(MESSAGES_SCHEMA.names()),
            events=events.select(EVENTS_SCHEMA.names()),
            rejects=rejects,
            duplicates=self.duplicates,
        )

    def _reject_rows(self, rejects: pl.DataFrame) -> pl.DataFrame:
        joined = rejects.join(
            self.base.select(
                "_row", "received_at", "topic", pl.col("payload").bin.head(EXCERPT_BYTES)
            ),
            on="_row",
            how="left",
            maintain_order="left",
        )
        # decoding with replacement has no vectorised equivalent; this runs per reject only
        excerpts = [
            bytes(p).decode("utf-8", errors="replace") for p in joined.get_column("payload")
        ]
        nul = "\x00"
        return joined.with_columns(payload_excerpt=pl.Series(excerpts, dtype=pl.String)).select(
            "received_at",
            *[
                pl.col(c).str.replace_all(nul, "\ufffd", literal=True)
                for c in ("topic", "reason", "detail", "payload_excerpt")
            ],
        )


def _concat(parts: list[pl.DataFrame], schema: dict[str, Any]) -> pl.DataFrame:
    """The parts in ``schema``; a column a part lacks (seq of scalar telemetry) is null."""
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat(
        [
            p.select(
                pl.col(c).cast(t) if c in p.columns else pl.lit(None, t).alias(c)
                for c, t in schema.items()
            )
            for p in parts
        ]
    )


def _first_failure(checks: Sequence[tuple[pl.Expr, Any, Any]]) -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) expressions of the first check whose condition holds, else null."""

    def lit(value: Any) -> pl.Expr:
        return value if isinstance(value, pl.Expr) else pl.lit(str(value))

    reason_chain: Any = pl
    detail_chain: Any = pl
    for condition, reason, detail in checks:
        cond = condition.fill_null(False)
        reason_chain = reason_chain.when(cond).then(lit(reason))
        detail_chain = detail_chain.when(cond).then(lit(detail))
    return (
        reason_chain.otherwise(pl.lit(None, pl.String)),
        detail_chain.otherwise(pl.lit(None, pl.String)),
    )


def _show(expr: pl.Expr, width: int = 64) -> pl.Expr:
    """A value for a human-readable detail: text, cut to ``width`` characters."""
    return expr.cast(pl.String).str.slice(0, width)


def _parse_ts(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> Datetime(us, UTC); null when it does not parse."""
    text = expr.str.replace(r"^(\d{4}-\d{2}-\d{2})[Tt ]", "${1}T").str.replace(r"[Zz]$", "+00:00")
    text = pl.when(text.str.contains(r"[+-]\d{2}:?\d{2}$")).then(text).otherwise(text + "+00:00")
    parsed = text.str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", time_zone="UTC", strict=False
    )
    return pl.when(expr.str.contains(_TS_PATTERN)).then(parsed).otherwise(None)


def _with_ts(frame: pl.DataFrame, source: str, target: str) -> pl.DataFrame:
    """Add ``target`` = ``source`` parsed by _parse_ts. Timestamps repeat a lot (one per
    envelope, shared by its measurements), so each distinct text is parsed once, the
    common ``...Z`` form by the fast direct format."""
    keys = frame.get_column(source).drop_nulls().unique().to_frame("_key")
    fast = pl.col("_key").str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=False
    )
    ok = pl.col("_key").str.contains(_TS_PATTERN) & ~pl.col("_key").str.contains(_LEAP_SECOND)
    table = keys.with_columns(_ok=ok, _parsed=fast)
    slow = table.filter(pl.col("_ok") & pl.col("_parsed").is_null())
    if slow.height:
        table = pl.concat(
            [
                table.filter(~(pl.col("_ok") & pl.col("_parsed").is_null())),
                slow.with_columns(_parsed=_parse_ts(pl.col("_key"))),
            ]
        )
    table = table.select("_key", pl.when("_ok").then("_parsed").otherwise(None).alias(target))
    return frame.join(table, left_on=source, right_on="_key", how="left", maintain_order="left")


def _out_of_range(value: pl.Expr) -> pl.Expr:
    return value.is_nan() | value.is_infinite() | (value.abs() > MAX_ABS_VALUE)


# ======================================================================================
# v2 envelopes (iot/{id}/...)
# ======================================================================================
def _ts_checks(
    text: pl.Expr, parsed: pl.Expr, where: pl.Expr, window: TsWindow, *, check_age: bool = True
) -> list[tuple[pl.Expr, Any, Any]]:
    """The checks of a present ``ts`` (``text``) parsed as ``parsed``: leap second, format,
    plausibility against ``received_at``. ``where`` names the field in the details."""
    received = pl.col("received_at")
    shown = received.dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
    checks: list[tuple[pl.Expr, Any, Any]] = [
        (
            text.str.contains(_LEAP_SECOND),
            R.TS_OUT_OF_RANGE,
            pl.format("{} '{}' is a leap second, which is not supported", where, _show(text)),
        ),
        (
            text.is_not_null() & parsed.is_null(),
            R.WRONG_TYPE,
            pl.format("{} '{}' is not an ISO 8601 date-time", where, _show(text)),
        ),
        (
            parsed > received + window.ahead,
            R.TS_OUT_OF_RANGE,
            pl.format(
                "{} '{}' is more than {} after receive time {}",
                where,
                _show(text),
                pl.lit(str(window.ahead)),
                shown,
            ),
        ),
    ]
    if check_age:
        checks.append(
            (
                parsed < received - window.age,
                R.TS_OUT_OF_RANGE,
                pl.format(
                    "{} '{}' is more than {} before receive time {}",
                    where,
                    _show(text),
                    pl.lit(str(window.age)),
                    shown,
                ),
            )
        )
    return checks


def _decode_v2(rows: pl.DataFrame, out: _Collector, ts_window: TsWindow) -> None:
    group_of = (
        pl.when(pl.col("kind") == "telemetry")
        .then(pl.lit("telemetry"))
        .when(pl.col("kind") == "status")
        .then(pl.lit("status"))
        .otherwise(pl.lit("event"))
    )
    rows = rows.with_columns(_group=group_of)
    for group in ("telemetry", "status", "event"):
        part = rows.filter(pl.col("_group") == group)
        if not part.height:
            continue
        parsed, env_issues, meas_issues = _parse_group(part, group, out)
        if not parsed.height:
            continue
        envelopes = _check_envelopes(parsed, env_issues, group, out, ts_window)
        if group == "telemetry":
            _emit_telemetry(envelopes, meas_issues, out, ts_window)
        else:
            _emit_events(envelopes, out)


def _parse_group(
    rows: pl.DataFrame, group: str, out: _Collector
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Parse one group's payloads. Returns (parsed rows joined to ``rows``, envelope issues,
    measurement issues); rows that cannot be parsed at all are rejected into ``out``.

    Fast path: one vectorised parse per chunk. If a chunk fails, it is split into up to
    _SPLIT_PARTS parts that are parsed again; the rows of parts that still fail take the
    slow path (``_diagnose``: json.loads per row). Bisecting further costs a re-parse per
    level, which with bad rows spread through a batch is far slower than the slow path."""
    strict = group != "telemetry"
    texts = rows.get_column("text")
    row_ids = rows.get_column("_row")
    parsed_parts: list[pl.DataFrame] = []
    slow: list[int] = []
    for start, stop in _byte_chunks(rows.get_column("size")):
        arr, _ = _try_parse(texts.slice(start, stop - start), group, strict)
        if arr is not None:
            parsed_parts.append(_struct_frame(row_ids.slice(start, stop - start), arr))
            continue
        n = stop - start
        if n <= _SPLIT_MIN_ROWS:
            slow.extend(range(start, stop))
            continue
        step = max(_SPLIT_MIN_ROWS, -(-n // _SPLIT_PARTS))
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            arr, _ = _try_parse(texts.slice(lo, hi - lo), group, strict)
            if arr is not None:
                parsed_parts.append(_struct_frame(row_ids.slice(lo, hi - lo), arr))
            else:
                slow.extend(range(lo, hi))

    env_issues: list[dict[str, Any]] = []
    meas_issues: list[dict[str, Any]] = []
    retry: dict[bool, tuple[list[int], list[str]]] = {True: ([], []), False: ([], [])}
    rejected: list[dict[str, Any]] = []
    for i in slow:  # the slow path: only rows of parts that failed the vectorised parse
        row = int(row_ids[i])
        result = _diagnose(texts[i], group, strict)
        if isinstance(result, _Rejected):
            rejected.append({"_row": row, "reason": result.reason, "detail": result.detail})
            continue
        env_issues += [
            {"_row": row, "field": f, "reason": r, "detail": d} for f, (r, d) in result.env.items()
        ]
        meas_issues += [
            {"_row": row, "_pos": pos, "field": f, "reason": r, "detail": d}
            for (pos, f), (r, d) in result.measurements.items()
        ]
        # event bodies are stored verbatim: a clean event is parsed again as received (and
        # must pass the strict parsers); anything else is parsed as repaired
        original = strict and not result.env
        retry[original][0].append(row)
        retry[original][1].append(texts[i] if original else result.text)
    for original, (ids, again) in retry.items():
        if not ids:
            continue
        good, bad = _parse_isolating(pl.Series("text", again, dtype=pl.String), group, original)
        parsed_parts += [_struct_frame(ids[lo : lo + len(arr)], arr) for lo, arr in good]
        rejected += [
            {
                "_row": ids[i],
                "reason": R.MALFORMED_JSON,
                "detail": f"payload refused by the JSON parser: {err}",
            }
            for i, err in bad
        ]
    out.reject(
        pl.DataFrame(rejected, schema={"_row": pl.Int64, "reason": pl.String, "detail": pl.String})
    )
    if not parsed_parts:
        return pl.DataFrame(), pl.DataFrame(), pl.DataFrame()
    parsed = pl.concat(parsed_parts, how="vertical").join(
        rows.drop("payload"), on="_row", how="inner"
    )
    env = _pivot_issues(env_issues, ["_row"], [_SELF, *[f for f, _ in _GROUP_SPECS[group]]])
    meas = _pivot_issues(meas_issues, ["_row", "_pos"], [_SELF, *[f for f, _ in _MEASUREMENT]])
    return parsed.sort("_row"), env, meas


def _byte_chunks(sizes: pl.Series) -> list[tuple[int, int]]:
    """Split rows into runs that start within the same _PARSE_CHUNK_BYTES window (so a run
    holds at most that plus one row), each parsed as one Arrow block."""
    cost = sizes.cast(pl.Int64) + 64
    if cost.sum() <= _PARSE_CHUNK_BYTES:
        return [(0, sizes.len())]
    window = (cost.cum_sum() - cost) // _PARSE_CHUNK_BYTES
    starts = (window != window.shift(1)).fill_null(True).arg_true().to_list()
    return list(itertools.pairwise([*starts, sizes.len()]))


def _struct_frame(row_ids: pl.Series | list[int], parsed: pa.Array) -> pl.DataFrame:
    """Parsed ``p`` structs -> columns, with their ``_row`` ids."""
    payload = pl.from_arrow(parsed)
    assert isinstance(payload, pl.Series) and payload.len() == len(row_ids)
    rows = pl.Series("_row", row_ids, dtype=pl.Int64)
    return (
        pl.DataFrame({"_row": rows, "p": payload})
        .with_columns(_pnull=pl.col("p").is_null())
        .unnest("p")
    )


def _pivot_issues(issues: list[dict[str, Any]], keys: list[str], fields: list[str]) -> pl.DataFrame:
    """One row per key, columns _pr_{field} (reason) and _pd_{field} (detail)."""
    table: dict[tuple[int, ...], dict[str, Any]] = {}
    for issue in issues:
        key = tuple(issue[k] for k in keys)
        entry = table.setdefault(key, dict(zip(keys, key, strict=True)))
        entry[f"_pr_{issue['field']}"] = str(issue["reason"])
        entry[f"_pd_{issue['field']}"] = issue["detail"]
    schema: dict[str, Any] = dict.fromkeys(keys, pl.Int64)
    for field in fields:
        schema[f"_pr_{field}"] = pl.String
        schema[f"_pd_{field}"] = pl.String
    return pl.DataFrame(list(table.values()), schema=schema)


def _with_issues(frame: pl.DataFrame, issues: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    if issues.height:
        return frame.join(issues, on=keys, how="left", maintain_order="left")
    extra = [pl.lit(None, pl.String).alias(c) for c in issues.columns if c not in keys]
    return frame.with_columns(extra)


def _pre(field: str) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """The check that applies an issue classified by the slow path to ``field``."""
    return (pl.col(f"_pr_{field}").is_not_null(), pl.col(f"_pr_{field}"), pl.col(f"_pd_{field}"))


# ---- vectorised parsing -----------------------------------------------------------------
def _parse_isolating(
    texts: pl.Series, group: str, strict: bool
) -> tuple[list[tuple[int, pa.Array]], list[tuple[int, str]]]:
    """Parse all texts at once; where that fails, bisect. Returns ([(first position,
    parsed structs of a contiguous run)], [(position, error) of each unparseable row])."""

    def attempt(lo: int, hi: int) -> tuple[pa.Array | None, str]:
        return _try_parse(texts.slice(lo, hi - lo), group, strict)

    good, bad = _bisect(texts.len(), attempt)
    return [(lo, result[0]) for lo, result in good], bad


def _read_json(data: bytes, schema: pa.Schema) -> pa.Table:
    return pajson.read_json(
        pa.BufferReader(data),
        read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 64),
        parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore"
        ),
    )


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else repr(exc)


def _count_values(data: bytes) -> int | str:
    """How many JSON values ``data`` holds, or why it does not parse."""
    try:
        # pyarrow 26 segfaults when the first value of the input is a top-level ``null``:
        # a leading ``{}`` sentinel keeps hostile payloads away from that position
        return _read_json(b"{}\n" + data, _EMPTY_SCHEMA).num_rows - 1
    except _PARSE_ERRORS as exc:
        return _error_text(exc)


_executors: dict[int, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()
_PARALLEL_MIN_ROWS = 256


def _background(fn: Callable[[bytes], int | str], data: bytes) -> Future[int | str]:
    """Run ``fn(data)`` on this process's worker thread (one per pid: an executor
    inherited through fork has no threads and would never run the work)."""
    with _executor_lock:
        executor = _executors.get(os.getpid())
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iot-decode")
            _executors.clear()
            _executors[os.getpid()] = executor
    return executor.submit(fn, data)


def _try_parse(texts: pl.Series, group: str, strict: bool) -> tuple[pa.Array | None, str]:
    """Parse ``texts`` in one go. Either (the ``p`` structs aligned with ``texts``, "") or
    (None, why): a failure of any row fails the whole call."""
    n = texts.len()
    if n == 0:
        return pa.array([], type=_WRAPPED_SCHEMAS[group].field("p").type), ""
    # 1. exactly one JSON value per payload: a value spanning payloads or trailing garbage
    #    fails this parse or changes the count. Arrow releases the GIL: for big inputs it
    #    runs in a worker thread while this thread does the typed parse.
    plain = texts.str.join("\n").item().encode()
    pending = _background(_count_values, plain) if n >= _PARALLEL_MIN_ROWS else None
    table: pa.Table | None = None
    error = ""
    try:
        # 2. the typed parse; the wrapper proves row i of the output is payload i
        wrapped = (
            pl.DataFrame({"t": texts})
            .select(
                pl.concat_str(
                    pl.lit('{"_i":'),
                    pl.int_range(n).cast(pl.String),
                    pl.lit(',"p":'),
                    pl.col("t"),
                    pl.lit("}"),
                ).str.join("\n")
            )
            .item()
            .encode()
        )
        table = _read_json(wrapped, _WRAPPED_SCHEMAS[group])
        index = pl.Series(table.column("_i").combine_chunks())
        if table.num_rows != n or not index.equals(
            pl.int_range(0, n, eager=True), check_names=False
        ):
            table, error = None, "payload rows are misaligned"
        # 3. event bodies are stored as jsonb: strict JSON (no NaN/Infinity), no \u0000
        elif strict and texts.str.json_decode(pl.Struct({})).len() != n:
            table, error = None, "payload is not a single JSON value"
        elif strict and texts.str.contains(_NUL_ESCAPE).any():
            table, error = None, "payload contains \\u0000, which cannot be stored as jsonb"
        elif strict and not all(map(_strictly_valid, texts)):
            table, error = None, "a payload has a duplicate key or an overflowing number"
    except _PARSE_ERRORS as exc:
        table, error = None, _error_text(exc)
    values = pending.result() if pending is not None else _count_values(plain)
    if isinstance(values, str):
        return None, values
    if values != n:
        return None, f"{values} JSON values in {n} payloads"
    if table is None:
        return None, error
    return table.column("p").combine_chunks(), ""


def _strictly_valid(text: str) -> bool:
    """An event payload passes the strict decoder: no duplicate key at any level (Arrow
    and Polars keep the last value silently), no number beyond a double. One C-speed
    json.loads per event; events are a small share of the traffic."""
    try:
        _STRICT_DECODER.decode(text)
    except (ValueError, RecursionError):
        return False
    return True


# ---- the slow path: diagnose one payload that failed the vectorised parse ----------------
@dataclass(frozen=True)
class _Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class _Repaired:
    text: str
    env: dict[str, tuple[str, str]]
    measurements: dict[tuple[int, str], tuple[str, str]]


class _DuplicateKeyError(ValueError):
    pass


class _Object(dict[str, Any]):
    """A JSON object read by the slow path; ``duplicates``: its keys that occur twice."""

    duplicates: frozenset[str] = frozenset()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _noting_duplicate_keys(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        obj.duplicates = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


class _HugeInt:
    """An integer literal too long for ``int()`` (Python's 4300-digit limit). Beyond the
    range of every field, so it gets the same verdict as any too large integer instead of
    failing the whole payload with Python's own error text."""


_HUGE_INT = _HugeInt()
_INT_DIGITS = 4000  # below sys.get_int_max_str_digits() (4300), sign included


def _parse_int(text: str) -> int | _HugeInt:
    return int(text) if len(text) <= _INT_DIGITS else _HUGE_INT


def _parse_strict_int(text: str) -> int:
    """Event bodies are stored as jsonb and must pass the strict parsers, which read
    numbers as doubles: an integer that overflows a double is refused like ``1e400``."""
    value = _parse_int(text)
    if isinstance(value, _HugeInt) or not -_MAX_FLOAT_INT < value < _MAX_FLOAT_INT:
        raise ValueError("a number overflows a double")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Telemetry: duplicates matter only for the fields the decoder reads (the body is not
# stored), exactly as the vectorised parser sees it. Events: stored verbatim, so any
# duplicate key anywhere is refused (jsonb would silently keep the last value).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_noting_duplicate_keys, parse_constant=float, parse_int=_parse_int
)
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys,
    parse_constant=_refuse_constant,
    parse_int=_parse_strict_int,
)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | _HugeInt):
        return "an integer"
    if isinstance(value, float):
        return "a non-integer number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _kind_issue(value: Any, kind: str, escapes: bool) -> tuple[str, str] | None:
    """Why ``value`` (not None) cannot be stored as ``kind`` (JSON type rules), or None.
    The detail follows the field name. ``escapes``: the payload has ``\\u`` escapes, so a
    string may hold a lone surrogate."""
    of = type(value)
    if kind == _STR:
        if of is not str:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected a string"
        if escapes:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return R.WRONG_TYPE, "is not valid Unicode (lone surrogate escape)"
        return None
    if of is _HugeInt and kind in (_INT, _NUM):
        if kind == _INT:
            return R.VALUE_OUT_OF_RANGE, "does not fit in 64 bits"
        return R.VALUE_OUT_OF_RANGE, "is not a finite number"
    if kind == _INT:
        if of is not int:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected an integer"
        if not -(2**63) <= value < 2**63:
            return R.VALUE_OUT_OF_RANGE, "does not fit in 64 bits"
        return None
    if kind == _NUM:
        if of is float:
            finite = math.isfinite(value)
        elif of is int:
            finite = -_MAX_FLOAT_INT < value < _MAX_FLOAT_INT
        else:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected a number"
        return None if finite else (R.VALUE_OUT_OF_RANGE, "is not a finite number")
    if of is not list:
        return R.WRONG_TYPE, f"is {_json_type(value)}, expected an array"
    return None


def _diagnose(text: str, group: str, strict: bool) -> _Rejected | _Repaired:
    """The slow path for one payload: reject it (not JSON, not an object), or rebuild it
    from the fields the decoder reads, with each badly typed field nulled and its issue
    remembered, so the vectorised checks decide in their usual order."""
    try:
        obj = (_STRICT_DECODER if strict else _DECODER).decode(text)
    except _DuplicateKeyError as exc:
        return _Rejected(R.MALFORMED_JSON, f"duplicate key {str(exc)[:64]!r}")
    except RecursionError:
        return _Rejected(R.MALFORMED_JSON, "JSON nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError, NaN in strict mode, int digit limit
        return _Rejected(R.MALFORMED_JSON, f"invalid JSON: {str(exc)[:160]}")
    if not isinstance(obj, dict):
        return _Rejected(R.WRONG_TYPE, f"payload is {_json_type(obj)}, expected a JSON object")
    if strict and (problem := _jsonb_problem(obj)):
        return _Rejected(R.MALFORMED_JSON, problem)
    if not strict and (duplicate := _read_duplicate(obj, group)):
        return _Rejected(R.MALFORMED_JSON, f"duplicate key {duplicate[:64]!r}")
    env: dict[str, tuple[str, str]] = {}
    measurements: dict[tuple[int, str], tuple[str, str]] = {}
    repaired: dict[str, Any] = {}
    escapes = "\\u" in text
    for field, kind in _GROUP_SPECS[group]:
        value = obj.get(field)
        issue = None if value is None else _kind_issue(value, kind, escapes)
        if issue:
            reason, detail = issue
            if field == "v" and reason == R.VALUE_OUT_OF_RANGE:
                reason = R.UNSUPPORTED_VERSION
            env[field] = (reason, f"{field} {detail}")
            value = None
        if field == "measurements" and value is not None:
            value = _repair_measurements(value, measurements, escapes)
        repaired[field] = value
    try:
        return _Repaired(
            json.dumps(repaired, ensure_ascii=False, allow_nan=False), env, measurements
        )
    except ValueError as exc:
        return _Rejected(R.MALFORMED_JSON, f"payload could not be decoded: {exc}")


def _read_duplicate(obj: dict[str, Any], group: str) -> str | None:
    """A duplicated key among the fields the decoder reads (envelope, measurements), or
    None: the ones the vectorised parser refuses too, whichever path a payload takes."""
    envelope = {field for field, _ in _GROUP_SPECS[group]}
    for key in sorted(getattr(obj, "duplicates", frozenset[str]()) & envelope):
        return key
    items = obj.get("measurements") if "measurements" in envelope else None
    if isinstance(items, list):
        fields = {field for field, _ in _MEASUREMENT}
        for item in items:
            for key in sorted(getattr(item, "duplicates", frozenset[str]()) & fields):
                return key
    return None


def _jsonb_problem(obj: dict[str, Any]) -> str | None:
    """Why an event payload, stored verbatim as a jsonb body, cannot be stored (what the
    strict parsers refuse beyond json.loads), or None."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except ValueError as exc:  # a number that overflows a double; UnicodeEncodeError
        if isinstance(exc, UnicodeEncodeError):
            return "invalid \\u escape (lone surrogate)"
        return "a number overflows a double"
    except RecursionError:
        return "JSON nested too deeply"
    if "\\u0000" in text and re.search(_NUL_ESCAPE, text):  # dumps escapes NUL as \u0000
        return "contains \\u0000, which cannot be stored as jsonb"
    return None


def _repair_measurements(
    items: list[Any], issues: dict[tuple[int, str], tuple[str, str]], escapes: bool
) -> list[Any]:
    if len(items) > MAX_MEASUREMENTS:
        return [None] * len(items)  # rejected as a whole by the vectorised count check
    repaired: list[Any] = []
    for pos, item in enumerate(items):
        if not isinstance(item, dict):
            issues[(pos, _SELF)] = (
                R.WRONG_TYPE,
                f"measurements[{pos}] is {_json_type(item)}, expected an object",
            )
            repaired.append(None)
            continue
        mtype, val, mts, unit = item.get("type"), item.get("val"), item.get("ts"), item.get("unit")
        if (
            not escapes
            and (mtype is None or type(mtype) is str)
            and (mts is None or type(mts) is str)
            and (unit is None or type(unit) is str)
            and (
                val is None
                or (type(val) is float and math.isfinite(val))
                or (type(val) is int and -_MAX_FLOAT_INT < val < _MAX_FLOAT_INT)
            )
        ):  # the common case, without the per-field calls below
            repaired.append({"type": mtype, "val": val, "ts": mts, "unit": unit})
            continue
        fixed: dict[str, Any] = {}
        for field, kind in _MEASUREMENT:
            value = item.get(field)
            if value is not None and (issue := _kind_issue(value, kind, escapes)):
                issues[(pos, field)] = (issue[0], f"measurements[{pos}].{field} {issue[1]}")
                value = None
            fixed[field] = value
        repaired.append(fixed)
    return repaired


# ---- vectorised envelope checks ----------------------------------------------------------
def _check_envelopes(
    parsed: pl.DataFrame, env_issues: pl.DataFrame, group: str, out: _Collector, window: TsWindow
) -> pl.DataFrame:
    frame = _with_ts(_with_issues(parsed, env_issues, ["_row"]), "ts", "_ts")
    v, device, ts, seq, msg_type = (pl.col(c) for c in ("v", "device_id", "ts", "seq", "msg_type"))
    seq_required = group != "status"
    checks: list[tuple[pl.Expr, Any, Any]] = [
        _pre(_SELF),
        (pl.col("_pnull"), R.WRONG_TYPE, pl.lit("payload is null, expected a JSON object")),
        _pre("v"),
        (v.is_null(), R.MISSING_FIELD, pl.lit("missing field 'v'")),
        (v != 2, R.UNSUPPORTED_VERSION, pl.format("v is {}, only v=2 is supported", v)),
        _pre("device_id"),
        (device.is_null(), R.MISSING_FIELD, pl.lit("missing field 'device_id'")),
        (
            device != pl.col("topic_device"),
            R.DEVICE_ID_MISMATCH,
            pl.format(
                "payload device_id '{}' differs from the topic's device id '{}'",
                _show(device),
                pl.col("topic_device"),
            ),
        ),
        _pre("ts"),
        (ts.is_null(), R.MISSING_FIELD, pl.lit("missing field 'ts'")),
        *_ts_checks(ts, pl.col("_ts"), pl.lit("ts"), window, check_age=group != "status"),
        _pre("seq"),
        (
            seq.is_null() & pl.lit(seq_required),
            R.MISSING_FIELD,
            pl.lit("missing field 'seq'"),
        ),
        (
            (seq < 0) | (seq > MAX_SEQ),
            R.VALUE_OUT_OF_RANGE,
            pl.format("seq {} is outside 0..{}", seq, pl.lit(MAX_SEQ)),
        ),
        _pre("msg_type"),
    ]
    if group == "telemetry":
        count = pl.col("measurements").list.len()
        checks += [
            (
                msg_type.is_not_null() & (msg_type != "telemetry"),
                R.WRONG_TYPE,
                pl.format("msg_type '{}' on a telemetry topic", _show(msg_type)),
            ),
            _pre("measurements"),
            (
                pl.col("measurements").is_null(),
                R.MISSING_FIELD,
                pl.lit("missing field 'measurements'"),
            ),
            (
                count > MAX_MEASUREMENTS,
                R.TOO_MANY_MEASUREMENTS,
                pl.format("{} measurements, limit is {}", count, pl.lit(MAX_MEASUREMENTS)),
            ),
        ]
    else:
        checks.append(
            (
                msg_type.is_not_null() & ~msg_type.str.contains(MSG_TYPE_PATTERN),
                R.WRONG_TYPE,
                pl.format(
                    "msg_type '{}' does not match {}", _show(msg_type), pl.lit(MSG_TYPE_PATTERN)
                ),
            )
        )
    if group == "status":
        status = pl.col("status")
        checks += [
            _pre("status"),
            (status.is_null(), R.MISSING_FIELD, pl.lit("missing field 'status'")),
            (
                ~status.is_in(["online", "offline"]),
                R.WRONG_TYPE,
                pl.format("status '{}' is neither 'online' nor 'offline'", _show(status)),
            ),
        ]
    accepted = out.reject_where(frame, checks)
    msg = msg_type.fill_null(pl.col("kind")) if group != "telemetry" else pl.lit("telemetry")
    accepted = accepted.with_columns(_msg_type=msg)
    seq_rows = accepted.filter(pl.col("seq").is_not_null())
    out.messages.append(
        seq_rows.select(
            "_row",
            device_id=pl.col("topic_device"),
            seq="seq",
            ts="_ts",
            received_at="received_at",
            msg_type="_msg_type",
        )
    )
    return accepted


def _emit_events(envelopes: pl.DataFrame, out: _Collector) -> None:
    out.events.append(
        envelopes.select(
            "_row",
            ts="_ts",
            device_id="topic_device",
            msg_type="_msg_type",
            seq="seq",
            body="text",
            received_at="received_at",
        )
    )


def _emit_telemetry(
    envelopes: pl.DataFrame, meas_issues: pl.DataFrame, out: _Collector, window: TsWindow
) -> None:
    # duplicate envelopes (device_id, seq): the first received wins (rows sorted by _row)
    envelopes = envelopes.sort("_row").with_columns(
        _dup=~pl.struct("topic_device", "seq").is_first_distinct()
    )
    items = (
        envelopes.select(
            "_row",
            "_dup",
            "topic_device",
            "seq",
            "received_at",
            "_ts",
            m="measurements",
            _pos=pl.int_ranges(0, pl.col("measurements").list.len(), dtype=pl.Int64),
        )
        .explode("m", "_pos")
        .filter(pl.col("_pos").is_not_null())
        .with_columns(_mnull=pl.col("m").is_null())
        .unnest("m")
    )
    items = _with_ts(_with_issues(items, meas_issues, ["_row", "_pos"]), "ts", "_mts")
    pos = pl.col("_pos")
    where = pl.format("measurements[{}]", pos)
    mtype, val, mts, unit = pl.col("type"), pl.col("val"), pl.col("ts"), pl.col("unit")
    checks: list[tuple[pl.Expr, Any, Any]] = [
        _pre(_SELF),
        (pl.col("_mnull"), R.WRONG_TYPE, pl.format("{} is null, expected an object", where)),
        _pre("type"),
        (mtype.is_null(), R.MISSING_FIELD, pl.format("{}: missing field 'type'", where)),
        (
            ~mtype.str.contains(METRIC_PATTERN),
            R.WRONG_TYPE,
            pl.format("{}.type '{}' is not a valid metric name", where, _show(mtype)),
        ),
        _pre("val"),
        (val.is_null(), R.MISSING_FIELD, pl.format("{}: missing field 'val'", where)),
        (
            _out_of_range(val),
            R.VALUE_OUT_OF_RANGE,
            pl.format(
                "{}.val {} is NaN, infinite or beyond ±{}", where, val, pl.lit(f"{MAX_ABS_VALUE:g}")
            ),
        ),
        _pre("ts"),
        *_ts_checks(mts, pl.col("_mts"), pl.format("{}.ts", where), window),
        _pre("unit"),
        (
            unit.is_not_null() & ~unit.str.contains(UNIT_PATTERN),
            R.WRONG_TYPE,
            pl.format("{}.unit '{}' is not a valid unit", where, _show(unit, 40)),
        ),
    ]
    reason, detail = _first_failure(checks)
    items = items.with_columns(_reason=reason, _detail=detail)
    kept = items.filter(~pl.col("_dup"))
    out.duplicates += items.filter(pl.col("_dup") & pl.col("_reason").is_null()).height

    bad = kept.filter(pl.col("_reason").is_not_null())
    if bad.height:
        totals = kept.group_by("_row").agg(_total=pl.len())
        summary = (
            bad.sort("_row", "_pos")
            .group_by("_row", maintain_order=True)
            .agg(
                reason=pl.col("_reason").first(),
                _n=pl.len(),
                _first=pl.col("_detail").head(5).str.join("; "),
            )
            .join(totals, on="_row", how="left")
            .with_columns(
                detail=pl.format(
                    "{} of {} measurements dropped: {}{}",
                    pl.col("_n"),
                    pl.col("_total"),
                    pl.col("_first"),
                    pl.when(pl.col("_n") > 5)
                    .then(pl.format("; ... {} more", pl.col("_n") - 5))
                    .otherwise(pl.lit("")),
                )
            )
        )
        out.reject(summary)

    good = kept.filter(pl.col("_reason").is_null())
    out.telemetry.append(
        good.select(
            "_row",
            "_pos",
            ts=pl.coalesce("_mts", "_ts"),
            device_id="topic_device",
            metric="type",
            value="val",
            unit="unit",
            received_at="received_at",
            seq="seq",
        )
    )


# ======================================================================================
# scalar topics: devices/{id}/{metric}, the payload a bare number
# ======================================================================================
def _decode_scalar(rows: pl.DataFrame, out: _Collector) -> None:
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
            pl.format("value '{}' is not finite", _show(pl.col("_t"))),
        ),
        (
            pl.col("_value").is_null(),
            R.WRONG_TYPE,
            pl.format("payload '{}' is not a number", _show(pl.col("_t"))),
        ),
        (
            _out_of_range(pl.col("_value")),
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


# ======================================================================================
# parametrised topics: {tele|stat|cmnd}/f2-{mac}/{mode}/{connector}/{component}
# ======================================================================================
def _decode_param(rows: pl.DataFrame, params: pl.DataFrame, out: _Collector) -> None:
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
        _show(pl.col("mode")),
        _show(pl.col("connector")),
        _show(pl.col("component")),
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
                _show(enc),
                _show(pl.col("_metric")),
            ),
        ),
        (
            (enc == "boolean") & pl.col("_bool").is_null(),
            R.WRONG_TYPE,
            pl.format("'{}' is not a boolean (1/0/true/false/on/off)", _show(t)),
        ),
        (
            (enc == "boolean_map") & ~t.str.contains(r"^[01]+$"),
            R.WRONG_TYPE,
            pl.format("'{}' is not a boolean map of 0/1 characters", _show(t)),
        ),
        (
            (enc == "boolean_map") & (t.str.len_bytes() > MAX_MEASUREMENTS),
            R.TOO_MANY_MEASUREMENTS,
            pl.format("{} positions, limit is {}", t.str.len_bytes(), pl.lit(MAX_MEASUREMENTS)),
        ),
        (
            (enc == "hex_to_float") & pl.col("_hex").is_null(),
            R.WRONG_TYPE,
            pl.format("'{}' is not 8 or 16 hex digits", _show(t)),
        ),
        (
            (enc == "hex_to_float") & _out_of_range(pl.col("_hex")),
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
