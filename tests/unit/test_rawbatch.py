"""The raw batch contract: schema, metadata and key layout round-trip (DESIGN §5)."""

from __future__ import annotations

import datetime as dt
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iot_platform.rawbatch import (
    RAW_SCHEMA,
    BatchKey,
    RawBatchError,
    encode_batch,
    hour_prefix,
    read_batch,
)

T0 = dt.datetime(2026, 11, 22, 9, 59, 59, 999_999, tzinfo=dt.UTC)
T0_US = int(T0.timestamp()) * 1_000_000 + T0.microsecond


def _encode(**overrides):
    args = {
        "received_at_us": [T0_US + 2, T0_US, T0_US + 1],
        "topics": ["iot/a/telemetry", "devices/b/temp", "iot/a/telemetry"],
        "payloads": [b'{"v":2}', b"23.5", b"\x00\xff"],
        "qos": [1, 0, 1],
        "retain": [False, False, True],
        "instance": "host-1",
        "seq": 42,
    }
    return encode_batch(**{**args, **overrides})


def test_encode_read_round_trip_keeps_bytes_order_and_metadata():
    encoded = _encode()
    assert encoded.key.key == (
        "raw/v1/date=2026-11-22/hour=09/20261122T095959999999Z-host-1-00000042.parquet"
    )
    assert encoded.key.partition_key == "2026-11-22-09:00"
    decoded = read_batch(encoded.data)
    assert decoded.table.schema.remove_metadata() == RAW_SCHEMA
    assert decoded.table.column("payload").to_pylist() == [b'{"v":2}', b"23.5", b"\x00\xff"]
    assert decoded.table.column("retain").to_pylist() == [False, False, True]
    assert decoded.metadata["iot.rows"] == "3"
    assert decoded.metadata["iot.batch_seq"] == "42"
    assert decoded.metadata["iot.instance"] == "host-1"
    assert decoded.metadata["iot.first_received_at"] == T0.isoformat()
    assert pq.ParquetFile(io.BytesIO(encoded.data)).metadata.row_group(0).column(2).compression == (
        "ZSTD"
    )


def test_key_parse_round_trip_and_sort_order_follows_time():
    keys = [
        BatchKey(T0 + dt.timedelta(microseconds=n), "a", n).key for n in (0, 1, 10**6, 3600 * 10**6)
    ]
    assert sorted(keys) == keys
    assert [BatchKey.parse(k).seq for k in keys] == [0, 1, 10**6, 3600 * 10**6]
    assert keys[-1].startswith(hour_prefix(T0 + dt.timedelta(hours=1)))


@pytest.mark.parametrize(
    "key",
    [
        "raw/v1/date=2026-11-22/hour=08/20261122T095959999999Z-a-00000001.parquet",  # wrong hour
        "raw/v1/date=2026-11-22/hour=09/20261122T095959999999Z-a/b-00000001.parquet",
        "raw/v2/date=2026-11-22/hour=09/20261122T095959999999Z-a-00000001.parquet",
        "../../etc/passwd",
    ],
)
def test_bad_keys_are_rejected(key):
    with pytest.raises(RawBatchError):
        BatchKey.parse(key)


def test_reader_refuses_other_schema_versions_and_garbage():
    with pytest.raises(RawBatchError, match="unreadable"):
        read_batch(b"not parquet")
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), sink)
    with pytest.raises(RawBatchError, match="schema version"):
        read_batch(sink.getvalue())


def test_bad_instance_and_empty_batches_are_refused():
    with pytest.raises(RawBatchError):
        _encode(instance="a/b")
    with pytest.raises(RawBatchError):
        _encode(received_at_us=[], topics=[], payloads=[], qos=[], retain=[])
