"""Decoding raw MQTT rows into warehouse rows (DESIGN §4-§6): every topic family, every
reject reason, hostile input, duplicates and determinism."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random

import polars as pl
import pyarrow as pa
import pytest

from iot_platform.decode import (
    EVENTS_SCHEMA,
    MAX_ABS_VALUE,
    MAX_MEASUREMENTS,
    MESSAGES_SCHEMA,
    REJECTS_SCHEMA,
    TELEMETRY_SCHEMA,
    DecodedFrames,
    JsonEngineLimits,
    RejectReason,
    TsWindow,
    decode_raw,
)
from iot_platform.decode.json_engine import byte_chunks
from iot_platform.device_ids import DEVICE_ID_REGEX
from iot_platform.rawbatch import RAW_SCHEMA, encode_batch, read_batch
from iot_platform.warehouse.migrations import CORE

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
MAC = "f2-a1b2c3d4e5f6"
TS = "2026-03-01T11:59:59.250Z"
TS_DT = dt.datetime(2026, 3, 1, 11, 59, 59, 250_000, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def raw(*rows, received=None) -> pa.Table:
    """rows: (topic, payload[, retain]); received_at one second apart unless given."""
    received = received or [at(i) for i in range(len(rows))]
    return pa.table(
        {
            "received_at": pa.array(received, pa.timestamp("us", tz="UTC")),
            "topic": pa.array([r[0] for r in rows], pa.string()).dictionary_encode(),
            "payload": pa.array(
                [r[1] if isinstance(r[1], bytes) else r[1].encode() for r in rows], pa.binary()
            ),
            "qos": pa.array([1] * len(rows), pa.int8()),
            "retain": pa.array([r[2] if len(r) > 2 else False for r in rows], pa.bool_()),
        },
        schema=RAW_SCHEMA,
    )


def envelope(device="dev-1", seq=1, measurements=None, **fields) -> str:
    body = {
        "v": 2,
        "device_id": device,
        "ts": TS,
        "seq": seq,
        "msg_type": "telemetry",
        "measurements": [{"type": "voltage_dc", "val": 756.3, "unit": "V"}]
        if measurements is None
        else measurements,
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not DROP})


DROP = object()


def event(kind="hello", device="dev-1", **fields) -> str:
    body = {"v": 2, "device_id": device, "ts": TS, "seq": 7, "msg_type": kind}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not DROP})


PARAMS = pl.DataFrame(
    {
        "device_id": [MAC] * 5,
        "mode": ["auto"] * 5,
        "connector": ["c1"] * 5,
        "component": ["relay", "doors", "power", "energy", "label"],
        "encoding": ["boolean", "boolean_map", "hex_to_float", "hex_to_float", "raw_string"],
        "metric": ["relay_on", "door", "power_w", "energy_wh", "label"],
        "unit": [None, None, "W", "Wh", None],
        "scale": [None, None, 0.5, None, None],
    }
)


def decode(*rows, parameters=PARAMS, **kwargs) -> DecodedFrames:
    out = decode_raw(raw(*rows), parameters, **kwargs)
    assert out.telemetry.schema == TELEMETRY_SCHEMA
    assert out.messages.schema == MESSAGES_SCHEMA
    assert out.events.schema == EVENTS_SCHEMA
    assert out.rejects.schema == REJECTS_SCHEMA
    return out


def reasons(out: DecodedFrames) -> list[str]:
    return out.rejects.get_column("reason").to_list()


def only_reject(out: DecodedFrames) -> dict:
    assert out.rejects.height == 1, out.rejects
    return out.rejects.row(0, named=True)


# ---- the happy paths, one per family ------------------------------------------------------
def test_the_warehouse_checks_device_ids_with_the_one_pattern():
    """Migration 1 is append-only history, so it carries the pattern as text: keep it equal."""
    assert f"device_id ~ '{DEVICE_ID_REGEX}'" in CORE.common


@pytest.mark.parametrize(
    ("device_id", "valid"),
    [("meter-01", True), ("A_b-9", True), ("-x", False), ("a.b", False), ("a" * 65, False)],
)
def test_the_decoder_applies_the_one_device_id_pattern(device_id, valid):
    out = decode((f"iot/{device_id}/telemetry", envelope(device=device_id)))
    assert (out.telemetry.height == 1) is valid, out.rejects


def test_telemetry_envelope_explodes_measurements_with_ts_fallback():
    payload = envelope(
        measurements=[
            {"ts": "2026-03-01T11:59:58Z", "type": "voltage_dc", "val": 756.3, "unit": "V"},
            {"type": "current_dc", "val": 12},
            {"type": "temp_internal", "val": -4.5e-3, "unit": "°C"},
        ]
    )
    out = decode(("iot/dev-1/telemetry", payload))
    assert out.rejects.is_empty() and out.duplicates == 0
    assert out.telemetry.rows() == [
        (
            dt.datetime(2026, 3, 1, 11, 59, 58, tzinfo=dt.UTC),
            "dev-1",
            "voltage_dc",
            756.3,
            "V",
            T0,
            1,
        ),
        (TS_DT, "dev-1", "current_dc", 12.0, None, T0, 1),
        (TS_DT, "dev-1", "temp_internal", -4.5e-3, "°C", T0, 1),
    ]
    assert out.messages.rows() == [("dev-1", 1, TS_DT, T0, "telemetry")]
    assert out.events.is_empty()


def test_telemetry_accepts_pretty_printed_json_and_msg_type_absent():
    body = json.loads(envelope())
    del body["msg_type"]
    out = decode(("iot/dev-1/telemetry", json.dumps(body, indent=2)))
    assert out.rejects.is_empty()
    assert out.telemetry.get_column("value").to_list() == [756.3]


def test_empty_measurement_list_is_a_message_without_rows():
    out = decode(("iot/dev-1/telemetry", envelope(measurements=[])))
    assert out.rejects.is_empty() and out.telemetry.is_empty()
    assert out.messages.height == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T11:59:59.250Z", TS_DT),
        ("2026-03-01T13:59:59.25+02:00", TS_DT),
        ("2026-03-01T06:59:59.250-0500", TS_DT),
        ("2026-03-01 11:59:59.250", TS_DT),  # no offset: UTC
        ("2026-03-01t11:59:59.250000999z", TS_DT),
        ("2026-03-01T11:59:59Z", TS_DT.replace(microsecond=0)),
    ],
)
def test_iso8601_timestamp_forms(text, expected):
    out = decode(("iot/dev-1/telemetry", envelope(ts=text)))
    assert out.rejects.is_empty()
    assert out.telemetry.get_column("ts").to_list() == [expected]


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("iot/dev-1/hello", "hello"),
        ("iot/dev-1/command/ack", "command_ack"),
        ("iot/dev-1/ota/status", "ota_status"),
    ],
)
def test_event_topics_default_msg_type_from_topic_and_keep_the_body(topic, kind):
    payload = event(kind=DROP, fw_version="2.1.0", cmd_id="c-1", progress_pct=40, nested={"a": [1]})
    out = decode((topic, payload))
    assert out.rejects.is_empty()
    assert out.events.rows() == [(TS_DT, "dev-1", kind, 7, payload, T0)]
    assert json.loads(out.events.item(0, "body"))["nested"] == {"a": [1]}
    assert out.messages.rows() == [("dev-1", 7, TS_DT, T0, kind)]


def test_event_msg_type_from_payload_wins():
    out = decode(("iot/dev-1/hello", event(kind="hello_v2")))
    assert out.events.get_column("msg_type").to_list() == ["hello_v2"]


def test_status_seq_is_optional_and_empty_retained_payload_is_ignored():
    offline = event(kind=DROP, seq=DROP, status="offline")
    out = decode(
        ("iot/dev-1/status", offline, True),
        ("iot/dev-1/status", b"", True),  # clear retained
        ("iot/dev-1/status", b"", False),  # the clear as forwarded to live subscribers
        ("iot/dev-1/status", event(kind="status", status="online", seq=3)),
    )
    assert out.rejects.is_empty()
    assert out.events.select("msg_type", "seq", "received_at").rows() == [
        ("status", None, at(0)),
        ("status", 3, at(3)),
    ]
    assert out.messages.get_column("seq").to_list() == [3]  # only envelopes carrying seq


def test_scalar_topic_is_a_bare_number_at_receive_time():
    out = decode(
        ("devices/sensor-7/temperature", "23.5"),
        ("devices/sensor-7/humidity", " -1e1\n"),
        ("devices/sensor-7/count", "+42"),
    )
    assert out.rejects.is_empty()
    assert out.telemetry.rows() == [
        (at(0), "sensor-7", "temperature", 23.5, None, at(0), None),
        (at(1), "sensor-7", "humidity", -10.0, None, at(1), None),
        (at(2), "sensor-7", "count", 42.0, None, at(2), None),
    ]


def test_parametrised_topics_decode_by_device_parameters():
    out = decode(
        (f"tele/{MAC}/auto/c1/relay", "ON"),
        (f"stat/{MAC}/auto/c1/relay", " false "),
        (f"cmnd/{MAC}/auto/c1/relay", "1"),
        (f"tele/{MAC}/auto/c1/doors", "0110"),
        (f"tele/{MAC}/auto/c1/power", "42C80000"),  # binary32 100.0, scale 0.5
        (f"tele/{MAC}/auto/c1/energy", "400921fb54442d18"),  # binary64 pi
        (f"tele/{MAC}/auto/c1/label", "Line 1 ✓"),
    )
    assert out.rejects.is_empty()
    rows = out.telemetry.select("metric", "value", "unit", "ts").rows()
    assert rows == [
        ("relay_on", 1.0, None, at(0)),
        ("relay_on", 0.0, None, at(1)),
        ("relay_on", 1.0, None, at(2)),
        ("door_1", 0.0, None, at(3)),
        ("door_2", 1.0, None, at(3)),
        ("door_3", 1.0, None, at(3)),
        ("door_4", 0.0, None, at(3)),
        ("power_w", 50.0, "W", at(4)),
        ("energy_wh", pytest.approx(3.141592653589793), "Wh", at(5)),
    ]
    assert set(out.telemetry.get_column("device_id")) == {MAC}
    assert out.events.rows() == [
        (at(6), MAC, "parameter", None, '{"metric":"label","value":"Line 1 ✓"}', at(6))
    ]
    assert json.loads(out.events.item(0, "body")) == {"metric": "label", "value": "Line 1 ✓"}


def test_raw_batch_round_trip_through_the_contract_reader():
    payloads = [envelope(seq=1).encode(), b"21.5", b"{oops"]
    encoded = encode_batch(
        received_at_us=[int(T0.timestamp() * 1_000_000) + n for n in (1, 2, 3)],
        topics=["iot/dev-1/telemetry", "devices/dev-1/temp", "iot/dev-1/telemetry"],
        payloads=payloads,
        qos=[1, 0, 1],
        retain=[False, False, False],
        instance="test",
        seq=1,
    )
    out = decode_raw(read_batch(encoded.data).table)
    assert out.telemetry.get_column("metric").to_list() == ["voltage_dc", "temp"]
    assert reasons(out) == ["malformed_json"]


def test_polars_input_and_empty_input():
    out = decode_raw(pl.from_arrow(raw(("devices/d1/t", "1"))))
    assert out.telemetry.height == 1
    empty = decode_raw(raw())
    assert empty.telemetry.is_empty() and empty.rejects.is_empty() and empty.duplicates == 0
    assert empty.telemetry.schema == TELEMETRY_SCHEMA
    assert empty.rejects.schema == REJECTS_SCHEMA


# ---- every reject reason -------------------------------------------------------------------
def _m(**fields):
    return {"type": "voltage_dc", "val": 1.0, **fields}


REJECT_CASES = [
    # malformed_json
    ("iot/dev-1/telemetry", '{"v":2,"device_id":', "malformed_json"),
    ("iot/dev-1/telemetry", "", "malformed_json"),
    ("iot/dev-1/telemetry", "   \n", "malformed_json"),
    ("iot/dev-1/telemetry", envelope() + envelope(seq=2), "malformed_json"),  # two values
    ("iot/dev-1/telemetry", envelope()[:-1] + '},"extra":1', "malformed_json"),  # trailing
    ("iot/dev-1/telemetry", envelope().replace('"v": 2', '"v": 2, "v": 2'), "malformed_json"),
    ("iot/dev-1/telemetry", b'{"v":2,"device_id":"dev-1\xff"}', "malformed_json"),
    ("iot/dev-1/telemetry", "\ufeff" + envelope(), "malformed_json"),
    ("iot/dev-1/hello", event(temp_internal=DROP)[:-1] + ', "temp": NaN}', "malformed_json"),
    ("iot/dev-1/hello", event()[:-1] + ', "x": Infinity}', "malformed_json"),
    ("iot/dev-1/hello", event(note="nul \u0000 byte"), "malformed_json"),  # not storable as jsonb
    ("iot/dev-1/hello", event()[:-1] + ', "x": "\\ud800"}', "malformed_json"),  # lone surrogate
    ("iot/dev-1/hello", event()[:-1] + ', "x": 1e400}', "malformed_json"),  # overflows a double
    (
        "iot/dev-1/hello",
        event()[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}",
        "malformed_json",
    ),
    # wrong_type
    ("iot/dev-1/telemetry", envelope(seq="5"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(seq=5.5), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(seq=5.0), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(seq=True), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements={"type": "a", "val": 1}), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements="[]"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(ts="yesterday"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(ts="2026-02-30T00:00:00Z"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(ts=1772366399), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(device_id=42), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(v="2"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(msg_type="hello"), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(val="1.5")]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(val=True)]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(type=7)]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(type="x'; DROP TABLE t;--")]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(unit=5)]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(ts="noon")]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=["voltage_dc=1"]), "wrong_type"),
    ("iot/dev-1/telemetry", envelope(measurements=[None]), "wrong_type"),
    ("iot/dev-1/telemetry", "[1, 2]", "wrong_type"),
    ("iot/dev-1/telemetry", "null", "wrong_type"),
    ("iot/dev-1/telemetry", '"text"', "wrong_type"),
    ("iot/dev-1/status", event(kind="status", status="maybe"), "wrong_type"),
    ("iot/dev-1/status", event(kind="status", status=1), "wrong_type"),
    ("iot/dev-1/hello", event(kind="hello world"), "wrong_type"),
    ("devices/dev-1/temp", "warm", "wrong_type"),
    ("devices/dev-1/temp", "0x10", "wrong_type"),
    ("devices/dev-1/temp", b"\xff\xfe", "wrong_type"),
    ("devices/dev-1/temp;drop", "1", "wrong_type"),
    (f"tele/{MAC}/auto/c1/relay", "maybe", "wrong_type"),
    (f"tele/{MAC}/auto/c1/doors", "01x1", "wrong_type"),
    (f"tele/{MAC}/auto/c1/power", "42C800", "wrong_type"),
    (f"tele/{MAC}/auto/c1/power", "zzzzzzzz", "wrong_type"),
    (f"tele/{MAC}/auto/c1/label", "a\x00b", "wrong_type"),
    # missing_field
    ("iot/dev-1/telemetry", envelope(v=DROP), "missing_field"),
    ("iot/dev-1/telemetry", envelope(device_id=DROP), "missing_field"),
    ("iot/dev-1/telemetry", envelope(ts=DROP), "missing_field"),
    ("iot/dev-1/telemetry", envelope(seq=DROP), "missing_field"),
    ("iot/dev-1/telemetry", envelope(seq=None), "missing_field"),
    ("iot/dev-1/telemetry", envelope(measurements=DROP), "missing_field"),
    ("iot/dev-1/telemetry", envelope(measurements=[{"type": "a"}]), "missing_field"),
    ("iot/dev-1/telemetry", envelope(measurements=[{"val": 1}]), "missing_field"),
    ("iot/dev-1/hello", event(seq=DROP), "missing_field"),
    ("iot/dev-1/status", event(kind="status"), "missing_field"),
    ("iot/dev-1/telemetry", "{}", "missing_field"),
    # unknown_family
    ("foo/bar", "1", "unknown_family"),
    ("iot/dev-1/unknown", "{}", "unknown_family"),
    ("iot/dev-1/telemetry/extra", envelope(), "unknown_family"),
    ("iot/a/b/telemetry", envelope(), "unknown_family"),
    ("devices/dev-1", "1", "unknown_family"),
    (f"tele/{MAC}/auto/c1", "1", "unknown_family"),
    ("", "1", "unknown_family"),
    # unknown_parameter
    (f"tele/{MAC}/auto/c1/unknown", "1", "unknown_parameter"),
    ("tele/f2-000000000000/auto/c1/relay", "1", "unknown_parameter"),
    # device_id_mismatch
    ("iot/dev-1/telemetry", envelope(device="dev-2"), "device_id_mismatch"),
    ("iot/dev-1/hello", event(device="DEV-1"), "device_id_mismatch"),
    # invalid_device_id
    (
        "iot/x';DROP TABLE telemetry;--/telemetry",
        envelope(device="x';DROP TABLE telemetry;--"),
        "invalid_device_id",
    ),
    ("iot/dévice/telemetry", envelope(device="dévice"), "invalid_device_id"),
    ("iot/" + "a" * 65 + "/telemetry", envelope(device="a" * 65), "invalid_device_id"),
    ("iot//telemetry", envelope(device=""), "invalid_device_id"),
    ("iot/-dash/hello", event(device="-dash"), "invalid_device_id"),
    ("iot/dev 1/status", event(kind="status", status="online"), "invalid_device_id"),
    ("devices/<script>/temp", "1", "invalid_device_id"),
    ("tele/f2-xyz/auto/c1/relay", "1", "invalid_device_id"),
    ("tele/dev-1/auto/c1/relay", "1", "invalid_device_id"),
    # value_out_of_range
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m(val=MAX_ABS_VALUE * 10)]),
        "value_out_of_range",
    ),
    ("iot/dev-1/telemetry", envelope(measurements=[_m(val=-1e13)]), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope().replace("756.3", "NaN"), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope().replace("756.3", "-Infinity"), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope().replace("756.3", "1e400"), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope().replace("756.3", "1" + "0" * 400), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope(seq=-1), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope(seq=2**32), "value_out_of_range"),
    ("iot/dev-1/telemetry", envelope(seq=2**70), "value_out_of_range"),
    ("devices/dev-1/temp", "nan", "value_out_of_range"),
    ("devices/dev-1/temp", "-Infinity", "value_out_of_range"),
    ("devices/dev-1/temp", "1e400", "value_out_of_range"),
    ("devices/dev-1/temp", "2e12", "value_out_of_range"),
    (f"tele/{MAC}/auto/c1/power", "7f800000", "value_out_of_range"),  # +inf
    (f"tele/{MAC}/auto/c1/energy", "7ff8000000000000", "value_out_of_range"),  # NaN
    # oversized (with the default 256 KiB limit)
    ("iot/dev-1/telemetry", "x" * (256 * 1024 + 1), "oversized"),
    ("iot/dev-1/status", "x" * (300 * 1024), "oversized"),
    # too_many_measurements
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m()] * (MAX_MEASUREMENTS + 1)),
        "too_many_measurements",
    ),
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[5] * (MAX_MEASUREMENTS + 1)),
        "too_many_measurements",
    ),
    (f"tele/{MAC}/auto/c1/doors", "01" * 101, "too_many_measurements"),
    # ts_out_of_range (received at T0 = 2026-03-01T12:00:00Z)
    ("iot/dev-1/telemetry", envelope(ts="9999-12-31T23:59:59Z"), "ts_out_of_range"),
    ("iot/dev-1/telemetry", envelope(ts="1970-01-01T00:00:00Z"), "ts_out_of_range"),
    ("iot/dev-1/telemetry", envelope(ts="2026-03-01T11:59:60Z"), "ts_out_of_range"),  # leap
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m(ts="9999-12-31T23:59:59Z")]),
        "ts_out_of_range",
    ),
    ("iot/dev-1/hello", event(ts="9999-12-31T23:59:59Z"), "ts_out_of_range"),
    (
        "iot/dev-1/status",
        event(kind="status", status="online", ts="9999-12-31T23:59:59Z"),
        "ts_out_of_range",
    ),
    # unsupported_version
    ("iot/dev-1/telemetry", envelope(v=1), "unsupported_version"),
    ("iot/dev-1/telemetry", envelope(v=3, seq="not checked after v"), "unsupported_version"),
    ("iot/dev-1/hello", event(v=2**70), "unsupported_version"),
]


def test_reject_cases_cover_every_reason():
    covered = {case[2] for case in REJECT_CASES} | {"unknown_device"}  # see the test below
    assert covered == {r.value for r in RejectReason}


def test_unregistered_devices_are_rejected_only_when_a_registry_is_given():
    rows = raw(("iot/dev-1/telemetry", envelope()), ("devices/stranger/temp", "21.5"))
    assert decode_raw(rows).telemetry.height == 2
    out = decode_raw(rows, known_devices={"dev-1"})
    assert out.telemetry.get_column("device_id").unique().to_list() == ["dev-1"]
    reject = out.rejects.row(0, named=True)
    assert (reject["reason"], reject["topic"]) == ("unknown_device", "devices/stranger/temp")
    assert "stranger" in reject["detail"] and reject["payload_excerpt"] == "21.5"


@pytest.mark.parametrize(("topic", "payload", "reason"), REJECT_CASES)
def test_reject_reason(topic, payload, reason):
    out = decode((topic, payload))
    reject = only_reject(out)
    assert reject["reason"] == reason, reject
    assert reject["detail"], reject
    assert reject["topic"] == topic and reject["received_at"] == T0
    raw_payload = payload if isinstance(payload, bytes) else payload.encode()
    expected = raw_payload[:256].decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    assert reject["payload_excerpt"] == expected
    assert out.telemetry.is_empty() and out.events.is_empty()


def test_reject_reason_values_are_snake_case():
    assert RejectReason.MALFORMED_JSON == "malformed_json"
    assert all(r.value == r.name.lower() for r in RejectReason)


def test_oversized_is_checked_before_parsing_with_a_10_mb_payload():
    huge = b'{"v":2,"device_id":"dev-1","measurements":[' + b"1," * (5 * 1024 * 1024) + b"1]}"
    out = decode(("iot/dev-1/telemetry", huge), ("devices/dev-1/t", "1"))
    assert reasons(out) == ["oversized"]
    assert str(len(huge)) in out.rejects.item(0, "detail")
    assert len(out.rejects.item(0, "payload_excerpt").encode()) <= 256
    assert out.telemetry.height == 1
    small = decode(("devices/dev-1/t", "12345"), max_payload_bytes=4)
    assert reasons(small) == ["oversized"]


@pytest.mark.parametrize(
    ("ts", "accepted"),
    [
        (T0 + dt.timedelta(days=1), True),  # exactly the default 1 day ahead
        (T0 + dt.timedelta(days=1, microseconds=1), False),
        (T0 - dt.timedelta(days=7), True),  # exactly the default 7 days old
        (T0 - dt.timedelta(days=7, microseconds=1), False),
    ],
)
def test_device_time_window_boundaries(ts, accepted):
    text = ts.isoformat().replace("+00:00", "Z")
    out = decode(("iot/dev-1/telemetry", envelope(ts=text)))
    assert out.telemetry.height == (1 if accepted else 0)
    if not accepted:
        reject = only_reject(out)
        assert reject["reason"] == "ts_out_of_range"
        assert text in reject["detail"] and "2026-03-01T12:00:00" in reject["detail"]
        assert out.messages.is_empty()  # no seq evidence from a message that was refused


def test_device_time_window_is_a_setting_and_measurement_level():
    window = TsWindow(ahead=dt.timedelta(seconds=5), age=dt.timedelta(hours=1))
    payload = envelope(
        ts="2026-03-01T11:59:59Z",
        measurements=[
            _m(ts="2026-03-01T12:00:06Z"),  # 6 s ahead of receive time
            _m(type="current_dc", ts="2026-03-01T10:59:59Z"),  # 1 h 1 s old
            _m(type="power_dc"),  # the envelope's ts
        ],
    )
    out = decode(("iot/dev-1/telemetry", payload), ts_window=window)
    assert out.telemetry.get_column("metric").to_list() == ["power_dc"]
    reject = only_reject(out)
    assert reject["reason"] == "ts_out_of_range"
    assert "2 of 3 measurements dropped" in reject["detail"]
    assert (
        "measurements[0].ts '2026-03-01T12:00:06Z' is more than 0:00:05 after" in reject["detail"]
    )
    assert (
        "measurements[1].ts '2026-03-01T10:59:59Z' is more than 1:00:00 before" in reject["detail"]
    )
    assert reasons(decode(("iot/dev-1/telemetry", payload))) == []  # default window: fine


def test_status_ts_may_be_old_but_not_ahead():
    # A last will carries the connect time, which may be weeks old; presence is ordered
    # by receive time. A status from the future is still refused.
    old = event(kind="status", seq=DROP, status="offline", ts="2025-01-01T00:00:00Z")
    out = decode(("iot/dev-1/status", old, True))
    assert out.rejects.is_empty() and out.events.height == 1
    ahead = event(kind="status", seq=DROP, status="online", ts="2026-03-03T00:00:00Z")
    assert reasons(decode(("iot/dev-1/status", ahead))) == ["ts_out_of_range"]


def test_leap_second_is_rejected_not_moved_to_the_next_minute():
    out = decode(
        ("iot/dev-1/telemetry", envelope(ts="2026-03-01T11:59:60Z")),
        (
            "iot/dev-1/telemetry",
            envelope(seq=2, measurements=[_m(ts="2026-03-01T11:59:60.5Z"), _m(type="b")]),
        ),
    )
    assert reasons(out) == ["ts_out_of_range", "ts_out_of_range"]
    assert "leap second" in out.rejects.item(0, "detail")
    assert out.telemetry.select("metric", "ts").rows() == [("b", TS_DT)]


HUGE_CASES = [
    # (topic, payload, reason or None, detail fragment, telemetry metrics kept)
    (
        "iot/dev-1/hello",
        event()[:-1] + ', "fw_version": "1", "fw_version": "2"}',
        "malformed_json",
        "duplicate key 'fw_version'",
        [],
    ),
    (
        "iot/dev-1/hello",
        event()[:-1] + ', "x": {"a": 1, "a": 2}}',
        "malformed_json",
        "duplicate key 'a'",
        [],
    ),
    (
        "iot/dev-1/status",
        event(kind="status", status="online")[:-1] + ', "status": "offline"}',
        "malformed_json",
        "duplicate key 'status'",
        [],
    ),
    ("iot/dev-1/telemetry", envelope()[:-1] + ', "pad": 1, "pad": 2}', None, "", ["voltage_dc"]),
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m(val=1, unit="V"), _m(type="b")]).replace(
            '"val": 1,', '"val": 1, "val": 2,'
        ),
        "malformed_json",
        "duplicate key 'val'",
        [],
    ),
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m(val=1, unit="V"), _m(type="b")]).replace(
            '"val": 1,', '"val": ' + "9" * 400 + ","
        ),
        "value_out_of_range",
        "measurements[0].val",
        ["b"],
    ),
    (
        "iot/dev-1/telemetry",
        envelope(measurements=[_m(val=1, unit="V"), _m(type="b")]).replace(
            '"val": 1,', '"val": -' + "9" * 5000 + ","
        ),
        "value_out_of_range",
        "measurements[0].val",
        ["b"],
    ),
    (
        "iot/dev-1/telemetry",
        envelope().replace('"seq": 1', '"seq": ' + "9" * 400),
        "value_out_of_range",
        "seq does not fit in 64 bits",
        [],
    ),
    (
        "iot/dev-1/telemetry",
        envelope().replace('"seq": 1', '"seq": ' + "9" * 5000),
        "value_out_of_range",
        "seq does not fit in 64 bits",
        [],
    ),
    (
        "iot/dev-1/hello",
        event()[:-1] + ', "n": ' + "9" * 400 + "}",
        "malformed_json",
        "a number overflows a double",
        [],
    ),
    (
        "iot/dev-1/hello",
        event()[:-1] + ', "n": ' + "9" * 5000 + "}",
        "malformed_json",
        "a number overflows a double",
        [],
    ),
]


@pytest.mark.parametrize("neighbour", [False, True], ids=["fast-path", "slow-path"])
@pytest.mark.parametrize(("topic", "payload", "reason", "detail", "kept"), HUGE_CASES)
def test_duplicate_keys_and_huge_numbers_get_one_verdict_on_either_path(
    topic, payload, reason, detail, kept, neighbour
):
    # A malformed neighbour sends its whole chunk down the slow path (json.loads per row):
    # the verdict must not depend on which path a payload took.
    rows = [(topic, "{broken")] if neighbour else []
    out = decode(*rows, (topic, payload))
    got = out.rejects.filter(pl.col("payload_excerpt") != "{broken")
    assert got.get_column("reason").to_list() == ([reason] if reason else [])
    if reason:
        assert detail in got.item(0, "detail")
    assert out.telemetry.get_column("metric").to_list() == kept
    assert out.events.is_empty() or reason is None


def test_parameters_missing_or_unsupported_encoding_is_unknown_parameter():
    assert reasons(decode((f"tele/{MAC}/auto/c1/relay", "1"), parameters=None)) == [
        "unknown_parameter"
    ]
    odd = PARAMS.with_columns(encoding=pl.lit("bcd"))
    out = decode((f"tele/{MAC}/auto/c1/relay", "1"), parameters=odd)
    assert reasons(out) == ["unknown_parameter"]
    assert "bcd" in out.rejects.item(0, "detail")


def test_duplicate_parameter_rows_first_wins_and_uppercase_mac_is_its_own_device():
    upper = "f2-A1B2C3D4E5F6"
    params = pl.concat(
        [
            PARAMS,
            PARAMS.head(1).with_columns(metric=pl.lit("shadowed")),
            PARAMS.head(1).with_columns(device_id=pl.lit(upper), metric=pl.lit("upper_relay")),
        ]
    )
    out = decode(
        (f"tele/{MAC}/auto/c1/relay", "off"),
        (f"tele/{upper}/auto/c1/relay", "on"),
        parameters=params,
    )
    assert out.telemetry.select("device_id", "metric", "value").rows() == [
        (MAC, "relay_on", 0.0),
        (upper, "upper_relay", 1.0),
    ]


# ---- one bad measurement, mixed batches ----------------------------------------------------
def test_one_bad_measurement_drops_only_that_measurement():
    payload = envelope(
        measurements=[
            _m(type="a", val=1),
            _m(type="b", val="2"),  # wrong JSON type: needs the slow path
            _m(type="c", val=3),
            _m(type="d", val=1e300),  # out of range, vectorised
        ]
    )
    out = decode(("iot/dev-1/telemetry", payload))
    assert out.telemetry.get_column("metric").to_list() == ["a", "c"]
    reject = only_reject(out)
    assert reject["reason"] == "wrong_type"
    assert reject["detail"].startswith(
        "2 of 4 measurements dropped: measurements[1].val is a string"
    )
    assert "measurements[3].val" in reject["detail"]
    assert reject["payload_excerpt"] == payload[:256]
    assert out.messages.height == 1  # the envelope itself was fine


def test_many_bad_measurements_detail_is_bounded():
    payload = envelope(measurements=[_m(type=f"m{i}", val="x") for i in range(50)] + [_m()])
    reject = only_reject(decode(("iot/dev-1/telemetry", payload)))
    assert reject["detail"].startswith("50 of 51 measurements dropped")
    assert reject["detail"].endswith("; ... 45 more")


def test_first_failing_check_in_field_order_wins():
    # device_id mismatch (field 2) is reported before the badly typed seq (field 4)
    assert reasons(decode(("iot/dev-1/telemetry", envelope(device="dev-2", seq="x")))) == [
        "device_id_mismatch"
    ]
    assert reasons(decode(("iot/dev-1/telemetry", envelope(v=1, device="dev-2")))) == [
        "unsupported_version"
    ]


def test_mixed_batch_good_rows_survive_bad_ones():
    good_before = envelope(device="dev-1", seq=1)
    good_after = envelope(device="dev-2", seq=1, measurements=[_m(type="t", val=2)])
    out = decode(
        ("iot/dev-1/telemetry", good_before),
        ("iot/dev-1/telemetry", '{"v":2,'),
        ("iot/dev-1/telemetry", envelope(seq="1")),
        ("iot/x';DROP TABLE telemetry;--/telemetry", good_before),
        ("devices/dev-3/temp", "hot"),
        ("iot/dev-2/telemetry", good_after),
        ("iot/dev-2/hello", event(device="dev-2")),
        ("iot/dev-2/hello", event(device="dev-2", seq=8)[:-1] + ', "x": NaN}'),
        ("devices/dev-3/temp", "21"),
        ("iot/dev-1/telemetry", b"\x80\x81"),
        ("nope", "1"),
    )
    assert out.telemetry.select("device_id", "metric", "value").rows() == [
        ("dev-1", "voltage_dc", 756.3),
        ("dev-2", "t", 2.0),
        ("dev-3", "temp", 21.0),
    ]
    assert out.events.select("device_id", "seq").rows() == [("dev-2", 7)]
    assert out.rejects.select("received_at", "reason").rows() == [
        (at(1), "malformed_json"),
        (at(2), "wrong_type"),
        (at(3), "invalid_device_id"),
        (at(4), "wrong_type"),
        (at(7), "malformed_json"),
        (at(9), "malformed_json"),
        (at(10), "unknown_family"),
    ]


def test_payloads_cannot_borrow_text_from_their_neighbours():
    # A hostile row leaves a value open hoping the next device's payload closes it.
    # Alignment is proven per row, so the victim's data is decoded as its own.
    victim = envelope(device="victim", measurements=[_m(type="real", val=1)])
    opener = envelope(device="evil")[:-1] + ', "x": {"device_id": "victim", "y":'
    closer = "}}"
    forged = (
        '{"v":2,"device_id":"victim","ts":"' + TS + '","seq":9,'
        '"measurements":[{"type":"forged","val":666}]} {"a":'
    )
    out = decode(
        ("iot/evil/telemetry", opener),
        ("iot/victim/telemetry", victim),
        ("iot/evil/telemetry", closer),
        ("iot/evil/telemetry", forged),
        ("iot/victim/telemetry", "1}"),
    )
    assert out.telemetry.select("device_id", "metric", "value").rows() == [("victim", "real", 1.0)]
    assert len(reasons(out)) == 4


def test_event_body_may_contain_an_escaped_backslash_before_u0000():
    payload = event(note="C:\\u0000 is not NUL")  # JSON text: "C:\\\\u0000 ..."
    assert "\\\\u0000" in payload
    out = decode(("iot/dev-1/hello", payload))
    assert out.rejects.is_empty()
    assert out.events.item(0, "body") == payload


def test_telemetry_ignores_oddities_in_fields_it_does_not_read():
    payload = envelope()[:-1] + ', "x": "\\ud800", "big": 1e400, "y": NaN}'
    out = decode(("iot/dev-1/telemetry", payload), ("iot/dev-1/telemetry", envelope(seq="x")))
    assert out.telemetry.height == 1
    assert reasons(out) == ["wrong_type"]


def test_big_inputs_are_parsed_in_chunks():
    production = JsonEngineLimits().chunk_bytes
    assert byte_chunks(pl.Series([10] * 5), production) == [(0, 5)]
    size = 1024 * 1024
    chunks = byte_chunks(pl.Series([size] * 100), production)
    assert chunks[0][0] == 0 and chunks[-1][1] == 100 and len(chunks) == 4
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all((hi - lo - 1) * size <= 32 * 1024 * 1024 for lo, hi in chunks)


def test_results_do_not_depend_on_chunk_and_split_sizes():
    rows = [
        ("iot/dev-1/telemetry", envelope(seq=i, ts=f"2026-03-01T11:00:{i:02d}Z"))
        if i % 7
        else ("iot/dev-1/telemetry", envelope(seq=i, measurements=[_m(val="x"), _m(type="ok")]))
        for i in range(60)
    ] + [("iot/dev-1/hello", event(seq=100 + i)) for i in range(20)]
    rows[33] = ("iot/dev-1/hello", "null")
    rows[34] = ("iot/dev-1/hello", event()[:-1] + ', "x": NaN}')
    expected = decode(*rows)
    tiny = JsonEngineLimits(chunk_bytes=3000, split_min_rows=2, parallel_min_rows=3)
    chunked = decode(*rows, limits=tiny)
    for left, right in zip(
        (expected.telemetry, expected.messages, expected.events, expected.rejects),
        (chunked.telemetry, chunked.messages, chunked.events, chunked.rejects),
        strict=True,
    ):
        assert left.equals(right)
    assert expected.duplicates == chunked.duplicates
    assert expected.rejects.height == 11


def test_deeply_nested_unknown_field_in_telemetry_is_fine():
    payload = envelope()[:-1] + ', "deep": ' + "[" * 20000 + "]" * 20000 + "}"
    out = decode(("iot/dev-1/telemetry", payload))
    assert out.rejects.is_empty() and out.telemetry.height == 1


def test_unicode_and_control_characters_never_reach_text_columns():
    out = decode(
        ("iot/dev-1/telemetry", envelope(measurements=[_m(type="temp\u0000x")])),
        ("iot/dev-1/telemetry", envelope(seq=2, measurements=[_m(unit="V\u0000")])),
        ("iot/dev-1/telemetry", envelope(seq=3, measurements=[_m(type="température")])),
        ("iot/dev\u0000/telemetry", envelope()),
        ("devices/dev-1/temp", "2\u00003"),
    )
    assert out.telemetry.is_empty()
    assert reasons(out) == [
        "wrong_type",
        "wrong_type",
        "wrong_type",
        "invalid_device_id",
        "wrong_type",
    ]
    for column in ("topic", "detail", "payload_excerpt"):
        assert not out.rejects.get_column(column).str.contains("\x00", literal=True).any()


def test_excerpt_is_256_bytes_with_replacement():
    payload = b"\xff" + b"\xc3\xa9" * 200
    out = decode(("iot/dev-1/telemetry", payload))
    excerpt = out.rejects.item(0, "payload_excerpt")
    assert excerpt == payload[:256].decode("utf-8", errors="replace")
    assert excerpt.startswith("\ufffd")


# ---- duplicates, gaps, order ---------------------------------------------------------------
def test_duplicate_envelopes_keep_the_first_received():
    first = envelope(seq=5, measurements=[_m(type="a", val=1), _m(type="b", val=2)])
    redelivered_later = envelope(
        seq=5, ts="2026-03-01T12:00:30Z", measurements=[_m(type="a", val=9)]
    )
    out = decode(
        ("iot/dev-1/telemetry", first),
        ("iot/dev-1/telemetry", first),
        ("iot/dev-1/telemetry", redelivered_later),
        ("iot/dev-2/telemetry", envelope(device="dev-2", seq=5)),  # another device: kept
    )
    assert out.telemetry.select("device_id", "metric", "value", "received_at").rows() == [
        ("dev-1", "a", 1.0, at(0)),
        ("dev-1", "b", 2.0, at(0)),
        ("dev-2", "voltage_dc", 756.3, at(3)),
    ]
    assert out.duplicates == 3  # 2 + 1 telemetry rows of the dropped envelopes
    # messages keep every envelope: the evidence for the seq duplicate check
    assert out.messages.select("device_id", "seq").rows() == [
        ("dev-1", 5),
        ("dev-1", 5),
        ("dev-1", 5),
        ("dev-2", 5),
    ]


def test_duplicate_rows_on_device_metric_ts_keep_the_first():
    out = decode(
        ("iot/dev-1/telemetry", envelope(seq=1, measurements=[_m(type="a", val=1)])),
        (
            "iot/dev-1/telemetry",
            envelope(seq=2, measurements=[_m(type="a", val=2), _m(type="a", val=3)]),
        ),
        ("devices/dev-1/temp", "1", False),
    )
    assert out.telemetry.select("metric", "value").rows() == [("a", 1.0), ("temp", 1.0)]
    assert out.duplicates == 2


def test_duplicate_events_and_bad_duplicate_rejects_are_not_repeated():
    hello = event()
    offline = event(kind="status", seq=DROP, status="offline")
    bad = envelope(seq=4, measurements=[_m(type="a", val="x"), _m(type="b", val=1)])
    out = decode(
        ("iot/dev-1/hello", hello),
        ("iot/dev-1/hello", hello),
        ("iot/dev-1/status", offline, True),
        ("iot/dev-1/status", offline, True),
        ("iot/dev-1/telemetry", bad),
        ("iot/dev-1/telemetry", bad),
    )
    assert out.events.select("msg_type", "received_at").rows() == [
        ("hello", at(0)),
        ("status", at(2)),
    ]
    assert out.telemetry.select("metric", "received_at").rows() == [("b", at(4))]
    assert out.duplicates == 3  # 2 events + 1 telemetry row
    assert out.rejects.select("received_at", "reason").rows() == [(at(4), "wrong_type")]


def test_seq_gaps_and_wraps_are_kept():
    out = decode(
        *[
            ("iot/dev-1/telemetry", envelope(seq=s, ts=f"2026-03-01T11:00:0{i}Z"))
            for i, s in enumerate([1, 2, 5, 4294967295, 0])
        ]
    )
    assert out.rejects.is_empty()
    assert out.messages.get_column("seq").to_list() == [1, 2, 5, 4294967295, 0]
    assert out.telemetry.height == 5


def test_output_is_sorted_by_received_at_and_deterministic():
    rows = [
        ("devices/d1/t", str(i))
        if i % 3
        else ("iot/dev-1/telemetry", envelope(seq=i, ts=f"2026-03-01T11:00:{i:02d}Z"))
        for i in range(30)
    ] + [("iot/dev-1/telemetry", "{bad")] * 3
    received = [at(i) for i in range(len(rows))]
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    shuffled = raw(*[rows[i] for i in order], received=[received[i] for i in order])
    a = decode_raw(raw(*rows, received=received))
    b = decode_raw(shuffled)
    for left, right in zip(
        (a.telemetry, a.messages, a.events, a.rejects),
        (b.telemetry, b.messages, b.events, b.rejects),
        strict=True,
    ):
        assert left.equals(right)
    assert a.telemetry.get_column("received_at").is_sorted()
    assert a.rejects.get_column("received_at").is_sorted()


def test_ties_in_received_at_keep_input_order():
    same = [at(0)] * 3
    out = decode_raw(
        raw(
            ("iot/dev-1/telemetry", envelope(seq=1, measurements=[_m(val=1)])),
            ("iot/dev-1/telemetry", envelope(seq=1, measurements=[_m(val=2)])),
            ("iot/dev-1/telemetry", envelope(seq=1, measurements=[_m(val=3)])),
            received=same,
        )
    )
    assert out.telemetry.get_column("value").to_list() == [1.0]


# ---- robustness ---------------------------------------------------------------------------
def test_fuzzed_payloads_never_raise_and_every_row_is_accounted_for():
    rng = random.Random(1234)
    base = [envelope(seq=1).encode(), event().encode(), b"23.5", b"0101", b"3f800000"]
    topics = [
        "iot/dev-1/telemetry",
        "iot/dev-1/hello",
        "iot/dev-1/status",
        "devices/dev-1/t",
        f"tele/{MAC}/auto/c1/doors",
        f"tele/{MAC}/auto/c1/power",
        "iot/\u00e9/telemetry",
    ]
    rows = []
    for _ in range(600):
        payload = bytearray(rng.choice(base))
        for _ in range(rng.randint(0, 4)):
            op = rng.randint(0, 3)
            pos = rng.randint(0, max(len(payload) - 1, 0))
            if op == 0 and payload:
                payload[pos] = rng.randint(0, 255)
            elif op == 1:
                del payload[pos:]
            elif op == 2:
                payload[pos:pos] = rng.choice(
                    [b"{", b"}", b'"', b",", b"NaN", b"\\u0000", b"\n", b"[["]
                )
            else:
                payload[pos:pos] = bytes(rng.randint(0, 255) for _ in range(3))
        rows.append((rng.choice(topics), bytes(payload)))
    out = decode(*rows)
    assert set(reasons(out)) <= {r.value for r in RejectReason}
    assert out.rejects.height <= len(rows)
    # every body we keep is strict JSON (it is stored as jsonb)
    for body in out.events.get_column("body"):
        json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in body"))
    # a second run gives the same answer
    again = decode(*rows)
    assert again.telemetry.equals(out.telemetry) and again.rejects.equals(out.rejects)


def test_many_bad_rows_are_isolated_in_a_big_batch():
    rows = []
    for i in range(3000):
        if i % 50 == 0:
            rows.append(("iot/dev-1/hello", event(seq=i)[:-1] + ', "x": "\\udc00"}'))
            continue
        if i % 97 == 0:
            rows.append(("iot/dev-1/telemetry", envelope(seq=i, measurements=[_m(val="bad")])))
        elif i % 89 == 0:
            rows.append(("iot/dev-1/telemetry", envelope(seq=i)[:-3]))
        else:
            rows.append(
                (
                    "iot/dev-1/telemetry",
                    envelope(seq=i, ts=f"2026-03-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z"),
                )
            )
    out = decode(*rows)
    hellos = len([i for i in range(3000) if i % 50 == 0])
    bad_val = len([i for i in range(3000) if i % 97 == 0 and i % 50])
    truncated = len([i for i in range(3000) if i % 89 == 0 and i % 97 and i % 50])
    assert out.telemetry.height == 3000 - hellos - bad_val - truncated
    assert sorted(set(reasons(out))) == ["malformed_json", "wrong_type"]
    assert out.rejects.height == hellos + bad_val + truncated
    assert out.events.is_empty()
