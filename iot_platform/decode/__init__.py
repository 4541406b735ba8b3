"""Decode raw MQTT rows (DESIGN §5) into warehouse rows (DESIGN §6), vectorised.

``decode_raw`` is pure: raw rows in, four frames and a duplicate count out. Bad input is
never raised; every message is decoded, ignored (see below) or rejected with a reason.

Where each part lives
---------------------
* ``schema``: the output contract (frame schemas, ``RejectReason``, ``TsWindow``, limits).
* ``screen``: raw rows in one order, topic families, size/registry/UTF-8 screening.
* ``json_engine``: the strict batched JSON reader (vectorised parse, isolation of bad
  rows, the per-row slow path); its batch sizes are ``JsonEngineLimits``.
* ``v2``, ``scalar``, ``parametrised``: each family's rules.
* ``collector``: the ordered-check vocabulary and the collection of verdicts into frames.

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

from collections.abc import Collection

import polars as pl
import pyarrow as pa

from iot_platform.decode.collector import Collector
from iot_platform.decode.json_engine import DEFAULT_JSON_LIMITS, JsonEngineLimits
from iot_platform.decode.parametrised import decode_param, prepare_parameters
from iot_platform.decode.scalar import decode_scalar
from iot_platform.decode.schema import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_TS_WINDOW,
    EVENTS_SCHEMA,
    EXCERPT_BYTES,
    MAX_ABS_VALUE,
    MAX_MEASUREMENTS,
    MAX_SEQ,
    MESSAGES_SCHEMA,
    METRIC_PATTERN,
    MSG_TYPE_PATTERN,
    PARAM_DEVICE_ID_PATTERN,
    PARAMETER_ENCODINGS,
    REJECTS_SCHEMA,
    TELEMETRY_SCHEMA,
    UNIT_PATTERN,
    UTC_US,
    DecodedFrames,
    RejectReason,
    TsWindow,
)
from iot_platform.decode.screen import prepare, screen, to_text
from iot_platform.decode.v2 import decode_v2

__all__ = [
    "DEFAULT_JSON_LIMITS",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DEFAULT_TS_WINDOW",
    "EVENTS_SCHEMA",
    "EXCERPT_BYTES",
    "MAX_ABS_VALUE",
    "MAX_MEASUREMENTS",
    "MAX_SEQ",
    "MESSAGES_SCHEMA",
    "METRIC_PATTERN",
    "MSG_TYPE_PATTERN",
    "PARAMETER_ENCODINGS",
    "PARAM_DEVICE_ID_PATTERN",
    "REJECTS_SCHEMA",
    "TELEMETRY_SCHEMA",
    "UNIT_PATTERN",
    "UTC_US",
    "DecodedFrames",
    "JsonEngineLimits",
    "RejectReason",
    "TsWindow",
    "decode_raw",
]


def decode_raw(
    raw: pa.Table | pl.DataFrame,
    parameters: pl.DataFrame | None = None,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    known_devices: Collection[str] | None = None,
    ts_window: TsWindow = DEFAULT_TS_WINDOW,
    limits: JsonEngineLimits = DEFAULT_JSON_LIMITS,
) -> DecodedFrames:
    """Decode raw MQTT rows (RAW_SCHEMA columns: received_at, topic, payload[, qos,
    retain]) into telemetry, messages, events and rejects (see the module docstring).

    ``parameters`` is the ``device_parameters`` table (device_id, mode, connector,
    component, encoding, metric[, unit, scale]); without it every parametrised message is
    unknown_parameter. ``known_devices`` is the device registry: when given, messages
    from a well-formed device id outside it are unknown_device (kept in the raw batch, so
    a backfill after enrolling the device recovers them). ``ts_window`` bounds device
    time relative to receive time. ``limits``: how the JSON engine cuts batches (memory
    versus re-parsing; the verdicts do not depend on them). Raises only on programming
    errors (missing columns, wrong types)."""
    base = prepare(raw)
    params = prepare_parameters(parameters)
    out = Collector(base)
    if base.height:
        rows = screen(base, out, max_payload_bytes, known_devices)
        rows = to_text(rows, out)
        v2 = rows.filter(pl.col("family") == "v2")
        if v2.height:
            decode_v2(v2, out, ts_window, limits)
        scalar = rows.filter(pl.col("family") == "scalar")
        if scalar.height:
            decode_scalar(scalar, out)
        param = rows.filter(pl.col("family") == "param")
        if param.height:
            decode_param(param, params, out)
    return out.finish()
