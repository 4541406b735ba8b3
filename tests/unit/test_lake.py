"""The raw lake's pure parts: the content checksum, the layout, the sort, the manifest."""

from __future__ import annotations

import datetime as dt
import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iot_platform import lake
from iot_platform.lake import Digest, LakeError, Manifest, Part, SourceEntry, digests
from iot_platform.rawbatch import RAW_SCHEMA, encode_batch, hour_prefix, read_batch

HOUR = dt.datetime(2026, 11, 30, 10, tzinfo=dt.UTC)
US0 = int(HOUR.timestamp() * 1_000_000)


def batch(rows: list[tuple[int, str, bytes]], *, seq: int = 1, qos: int = 1) -> pa.Table:
    encoded = encode_batch(
        received_at_us=[US0 + r[0] for r in rows],
        topics=[r[1] for r in rows],
        payloads=[r[2] for r in rows],
        qos=[qos] * len(rows),
        retain=[False] * len(rows),
        instance="unit",
        seq=seq,
    )
    return read_batch(encoded.data).table


ROWS = [
    (0, "iot/dev-b/telemetry", b'{"seq":1}'),
    (1, "devices/dev-a/temp", b"23.5"),
    (2, "tele/f2-aabbccddeeff/m/1/relay", b"0101"),
    (3, "iot/dev-a/hello", b""),
    (4, "iot/dev-b/telemetry", b'{"seq":1}'),  # same payload, other time: another row
]


def test_checksum_ignores_row_order_and_batching():
    whole = Digest.of(batch(ROWS))
    assert whole.rows == 5
    assert Digest.of(batch(list(reversed(ROWS)))) == whole
    split = digests([batch(ROWS[:2], seq=1), batch(ROWS[2:], seq=2)])
    assert split[0] + split[1] == whole
    assert [d.rows for d in split] == [2, 3]


@pytest.mark.parametrize(
    "change",
    [
        lambda r: (r[0] + 1, r[1], r[2]),  # one microsecond later
        lambda r: (r[0], r[1].replace("dev-b", "dev-c"), r[2]),
        lambda r: (r[0], r[1], r[2] + b" "),
        lambda r: (r[0], r[1], r[2][:-1]),
    ],
)
def test_checksum_sees_any_changed_field(change):
    changed = [change(ROWS[0]), *ROWS[1:]]
    assert Digest.of(batch(changed)) != Digest.of(batch(ROWS))
    assert Digest.of(batch(ROWS, qos=0)) != Digest.of(batch(ROWS))


def test_checksum_counts_a_duplicate_row():
    once, twice = Digest.of(batch(ROWS[:1])), Digest.of(batch(ROWS[:1] * 2))
    assert twice.rows == 2 and twice.checksum == (2 * once.checksum) % 2**64


def _xxh3(value: str | bytes) -> int:
    return pl.Series([value]).to_frame("v").select(lake._xxh3(pl.col("v"))).item()


def test_row_hash_is_standard_xxh3():
    assert _xxh3(b"") == 0x2D06800538D394C2  # XXH3_64bits of empty input, seed 0


def test_checksum_is_its_documented_definition():
    """CHECKSUM_ALGORITHM, computed row by row in Python: the vectorised split into two
    32-bit sums must give the same 64-bit wrapping sum."""
    total = 0
    for offset, topic, payload in ROWS:
        text = f"{US0 + offset}|{_xxh3(topic)}|{_xxh3(payload)}|1|false"
        total = (total + _xxh3(text)) % 2**64
    assert Digest.of(batch(ROWS)) == Digest(len(ROWS), total)


def test_checksum_is_stable_across_releases():
    """A manifest outlives upgrades: the same rows must hash the same under a later Polars
    or polars-hash, or old hours could never be verified again. This value was computed
    with polars 2.1.0 / polars-hash 0.9.3; a change means an upgrade broke the checksum."""
    assert Digest.of(batch(ROWS)).hex == "1ca8db027f8403cb"


def test_checksum_of_the_lake_file_equals_the_sources():
    data = lake.encode_part(
        [batch(ROWS[:3], seq=1), batch(ROWS[3:], seq=2)], hour=HOUR, generation="g"
    )
    assert Digest.of(pq.read_table(io.BytesIO(data))) == Digest.of(batch(ROWS))


def test_a_lake_file_is_sorted_by_device_then_time_with_row_group_statistics(monkeypatch):
    monkeypatch.setattr(lake, "ROW_GROUP_ROWS", 2)
    data = lake.encode_part([batch(ROWS)], hour=HOUR, generation="g")
    file = pq.ParquetFile(io.BytesIO(data))
    table = file.read()
    assert table.schema.field("topic").type == RAW_SCHEMA.field("topic").type
    assert table.column("device_id").to_pylist() == [
        "dev-a",
        "dev-a",
        "dev-b",
        "dev-b",
        "f2-aabbccddeeff",
    ]
    times = table.column("received_at").to_pylist()
    assert times[0] < times[1] and times[2] < times[3]
    assert file.metadata.num_row_groups == 3
    device = table.schema.get_field_index("device_id")
    stats = [file.metadata.row_group(g).column(device).statistics for g in range(3)]
    assert [(s.min, s.max) for s in stats] == [
        ("dev-a", "dev-a"),
        ("dev-b", "dev-b"),
        ("f2-aabbccddeeff", "f2-aabbccddeeff"),
    ]
    assert file.schema_arrow.metadata[b"iot.generation"] == b"g"


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("iot/dev-1/telemetry", "dev-1"),
        ("iot/dev-1/command/ack", "dev-1"),
        ("devices/meter-7/temp", "meter-7"),
        ("stat/f2-001122334455/a/b/c", "f2-001122334455"),
        ("orphan", None),
    ],
)
def test_device_id_is_the_topics_device_level(topic, device):
    frame = pl.DataFrame({"topic": [topic]})
    assert frame.select(lake.device_id_expr()).item() == device


def test_lake_keys_reuse_the_raw_partition_path():
    assert hour_prefix(HOUR) == "raw/v1/date=2026-11-30/hour=10/"
    assert lake.lake_prefix(HOUR) == "lake/v1/date=2026-11-30/hour=10/"
    assert lake.manifest_key(HOUR) == "lake/manifests/v1/date=2026-11-30/hour=10.json"
    # outside lake/v1/: a glob over the data files never matches a manifest
    assert not lake.manifest_key(HOUR).startswith(lake.LAKE_ROOT)


def test_generation_depends_on_the_set_of_batches_only():
    assert lake.generation_of(["b", "a"]) == lake.generation_of(["a", "b"])
    assert lake.generation_of(["a"]) != lake.generation_of(["a", "b"])


def test_manifest_round_trip_and_foreign_versions_refused():
    manifest = Manifest(
        hour=HOUR,
        generation="0123456789abcdef",
        compacted_at=HOUR + dt.timedelta(hours=2),
        digest=Digest(5, 2**64 - 1),
        parts=(Part("lake/v1/date=2026-11-30/hour=10/part-x-000.parquet", 5, 999),),
        sources={"raw/v1/k.parquet": SourceEntry("etag", 12, Digest(5, 2**64 - 1))},
    )
    assert Manifest.loads(manifest.dumps()) == manifest
    foreign = manifest.dumps().replace(b'"version":1', b'"version":2')
    with pytest.raises(LakeError, match="version"):
        Manifest.loads(foreign)


def test_groups_never_split_an_input_and_respect_the_cap():
    tables = [batch(ROWS[:n], seq=n) for n in (2, 2, 3, 1)]
    groups = list(lake._groups(iter([(None, t) for t in tables]), max_rows=4))
    assert [[t.num_rows for _, t in g] for g in groups] == [[2, 2], [3, 1]]
    groups = list(lake._groups(iter([(None, t) for t in tables]), max_rows=1))
    assert [[t.num_rows for _, t in g] for g in groups] == [[2], [2], [3], [1]]


def test_raw_batches_may_not_outlive_the_load_ledger(monkeypatch):
    from iot_platform.settings import LakeSettings, SettingsError

    monkeypatch.setenv("IOT_RETENTION_LEDGER_DAYS", "8")
    monkeypatch.setenv("IOT_RAW_BATCH_RETENTION_HOURS", "192")
    assert LakeSettings.from_env().raw_retention_hours == 192
    monkeypatch.setenv("IOT_RAW_BATCH_RETENTION_HOURS", "193")
    with pytest.raises(SettingsError, match=r"IOT_RAW_BATCH_RETENTION_HOURS=193.*LEDGER_DAYS=8"):
        LakeSettings.from_env()
    monkeypatch.setenv("IOT_RETENTION_LEDGER_DAYS", "0")  # the ledger kept forever
    assert LakeSettings.from_env().raw_retention_hours == 193
