"""What the decoder promises its callers: the limits and patterns a message is held to, the
four output frames' schemas, the reject reasons and the device-time window.

One definition each: the warehouse's loader types its COPY columns from these schemas, and
every family's rules (``v2``, ``scalar``, ``parametrised``) read the same limits."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

import polars as pl
from polars.datatypes import DataTypeClass

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
