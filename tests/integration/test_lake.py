"""The compacted raw lake on the real local store and the real S3 server (moto, through
the minio SDK): compaction, late batches, verification failures, the analysts' reader,
and the retention pass against the real load ledger in PostgreSQL, run as Dagster runs."""

from __future__ import annotations

import datetime as dt
import io
import secrets
from collections import Counter

import dagster as dg
import pyarrow.parquet as pq
import pytest

from iot_platform import lake
from iot_platform.analyst import raw_messages
from iot_platform.defs.lake.compaction import raw_lake, raw_lake_compaction_sensor
from iot_platform.defs.lake.retention import LIFECYCLE_CLEAR, raw_batch_retention
from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.lake import Digest, HourNotClosed, LakeError, compact_hour, expire_raw_batches
from iot_platform.objectstore import LocalDirectoryStore, ObjectStore, S3Store
from iot_platform.rawbatch import KEY_ROOT, hour_prefix, read_batch
from iot_platform.warehouse.migrations import migrate
from tests.integration.test_pipeline import _warehouse
from tests.warehouse_data import put_batch, telemetry_messages

pytestmark = pytest.mark.integration

HOUR = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)
LATER = HOUR + dt.timedelta(days=1)
LATENESS = dt.timedelta(minutes=30)
DEVICES = ["dev-a", "dev-b", "dev-c"]


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, s3_server, monkeypatch):
    """A store plus the environment that makes ``raw_messages`` and the resources read it."""
    if request.param == "local":
        root = tmp_path / "objects"
        store: ObjectStore = LocalDirectoryStore(root)
        resource = ObjectStoreResource(backend="local", local_dir=str(root))
        monkeypatch.setenv("IOT_OBJECT_STORE", "local")
        monkeypatch.setenv("IOT_LOCAL_STORE_DIR", str(root))
    else:
        bucket = f"lake-{secrets.token_hex(4)}"
        store = S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
        resource = ObjectStoreResource(
            backend="s3",
            endpoint=s3_server.endpoint,
            bucket=bucket,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        )
        monkeypatch.setenv("IOT_OBJECT_STORE", "s3")
        monkeypatch.setenv("IOT_S3_ENDPOINT", s3_server.endpoint)
        monkeypatch.setenv("IOT_S3_BUCKET", bucket)
        monkeypatch.setenv("IOT_S3_ACCESS_KEY", s3_server.access_key)
        monkeypatch.setenv("IOT_S3_SECRET_KEY", s3_server.secret_key)
    monkeypatch.setenv("IOT_HOME", str(tmp_path / "home"))
    store.ensure_ready()
    return store, resource


def fill(store: ObjectStore, hour: dt.datetime, *, seq: int, minutes: int = 0) -> list[str]:
    """Two daemons' batches, overlapping in time, a few messages each."""
    keys = []
    for instance, offset in (("d1", 0), ("d2", 7)):
        messages = telemetry_messages(
            DEVICES,
            hour + dt.timedelta(minutes=minutes, seconds=offset),
            4,
            seed=seq,
            first_seq=seq * 100,
        )
        keys.append(put_batch(store, messages, seq=seq, instance=instance).key)
    return keys


def stored_rows(store: ObjectStore, keys: list[str]) -> Counter:
    """Every message of these batches, as a multiset."""
    rows: Counter = Counter()
    for key in keys:
        table = read_batch(store.get(key)).table.to_pydict()
        rows.update(
            zip(table["received_at"], map(str, table["topic"]), table["payload"], strict=True)
        )
    return rows


def read_back(start: dt.datetime, end: dt.datetime) -> Counter:
    frame = raw_messages(start, end).collect()
    return Counter(
        zip(frame["received_at"].to_list(), frame["topic"].cast(str), frame["payload"], strict=True)
    )


def materialization(run: dg.ExecuteInProcessResult) -> dict:
    (event,) = run.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def keys_under(store: ObjectStore, prefix: str) -> set[str]:
    return {info.key for info in store.list(prefix)}


def test_compacts_a_closed_hour_once_sorted_and_verified(backend):
    store, _ = backend
    sources = fill(store, HOUR, seq=1) + fill(store, HOUR, seq=2, minutes=20)
    store.put(hour_prefix(HOUR) + "notes.txt", b"not a batch")  # ignored, never deleted
    result = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=30)
    manifest = result.manifest
    assert result.status == "compacted" and manifest is not None
    assert set(manifest.sources) == set(sources)
    assert len(manifest.parts) == 2  # 48 rows, at most 30 per file, batches never split
    expected = sum(lake.digests([lake._read_batch_table(store, k) for k in sources]), Digest())
    assert manifest.digest == expected and expected.rows == 48
    for part in manifest.parts:
        table = pq.read_table(io.BytesIO(store.get(part.key)))
        order = list(
            zip(table["device_id"].to_pylist(), table["received_at"].to_pylist(), strict=True)
        )
        assert order == sorted(order)
    assert keys_under(store, lake.lake_prefix(HOUR)) == {p.key for p in manifest.parts}

    before = {i.key: i.etag for i in store.list("")}
    again = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=30)
    assert again.status == "up to date"
    assert {i.key: i.etag for i in store.list("")} == before
    assert (
        lake.hours_needing_compaction(
            store, LATER, lateness=LATENESS, lookback=dt.timedelta(days=2)
        )
        == {}
    )
    assert read_back(HOUR, HOUR + dt.timedelta(hours=1)) == stored_rows(store, sources)


def test_an_open_hour_is_not_compacted(backend):
    store, _ = backend
    fill(store, HOUR, seq=1)
    almost = HOUR + dt.timedelta(hours=1) + LATENESS - dt.timedelta(seconds=1)
    with pytest.raises(HourNotClosed, match="lateness"):
        compact_hour(store, HOUR, almost, lateness=LATENESS, max_rows=1000)
    assert keys_under(store, "lake/") == set()
    assert (
        lake.hours_needing_compaction(
            store, almost, lateness=LATENESS, lookback=dt.timedelta(days=1)
        )
        == {}
    )


def test_late_batches_are_read_then_merged_and_nothing_is_lost(backend):
    store, _ = backend
    window = (HOUR - dt.timedelta(hours=1), HOUR + dt.timedelta(hours=2))
    sources = fill(store, HOUR, seq=1)
    open_hour = fill(store, HOUR + dt.timedelta(hours=1), seq=9)  # not compacted: read raw
    first = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=1000).manifest
    assert first is not None

    late = fill(store, HOUR, seq=3, minutes=50)
    everything = stored_rows(store, sources + late + open_hour)
    assert read_back(*window) == everything  # compacted + late + open, each once
    pending = lake.hours_needing_compaction(
        store, LATER, lateness=LATENESS, lookback=dt.timedelta(days=1)
    )
    assert pending[HOUR] == sorted(late)

    second = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=1000)
    assert second.status == "compacted" and second.manifest is not None
    assert second.previous_parts == 1 and second.new_batches == 2
    assert second.removed_parts == [p.key for p in first.parts]
    assert second.manifest.digest.rows == first.digest.rows + 24
    assert read_back(*window) == everything

    # micro-batches deleted (all loaded long ago), then one more arrives late
    report = expire_raw_batches(
        store,
        lambda _partition: dict.fromkeys(sources + late, HOUR),
        LATER + dt.timedelta(days=1),
        retention=dt.timedelta(hours=1),
    )
    assert report.deleted == 4 and report.hours_emptied == ["2026-11-20-10:00"]
    assert report.kept == {"not compacted": 2}
    assert report.uncompacted_hours == ["2026-11-20-11:00"]
    assert read_back(*window) == everything
    latest = fill(store, HOUR, seq=4, minutes=55)
    everything += stored_rows(store, latest)
    assert read_back(*window) == everything
    third = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=1000).manifest
    assert third is not None and set(third.sources) == set(sources + late + latest)
    assert read_back(*window) == everything


def test_a_lake_file_that_does_not_verify_blocks_compaction_and_deletion(backend):
    store, _ = backend
    sources = fill(store, HOUR, seq=1)
    manifest = compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=1000).manifest
    assert manifest is not None
    # a part silently replaced by other (valid) rows: the row count may match, the sum not
    elsewhere = fill(store, HOUR - dt.timedelta(days=1), seq=7)
    other = [lake._read_batch_table(store, k) for k in elsewhere]
    store.put(manifest.parts[0].key, lake.encode_part(other, hour=HOUR, generation="x"))
    stored_manifest = store.get(lake.manifest_key(HOUR))
    fill(store, HOUR, seq=2, minutes=30)  # late: a re-compaction must merge the bad part
    with pytest.raises(LakeError, match="no longer match their manifest"):
        compact_hour(store, HOUR, LATER, lateness=LATENESS, max_rows=1000)
    assert store.get(lake.manifest_key(HOUR)) == stored_manifest
    assert keys_under(store, lake.lake_prefix(HOUR)) == {manifest.parts[0].key}

    report = expire_raw_batches(
        store,
        lambda _partition: dict.fromkeys(sources, HOUR),
        LATER + dt.timedelta(days=1),
        retention=dt.timedelta(hours=1),
    )
    assert report.deleted == 0 and list(report.failed_hours) == ["2026-11-20-10:00"]
    assert set(sources) <= keys_under(store, KEY_ROOT)


def test_dagster_compaction_and_retention_with_the_real_ledger(backend, postgres_db, monkeypatch):
    """Only batches that are loaded (ledger), compacted and verified go; the pass says why
    each other batch stays, and its check names the hour to backfill."""
    store, resource = backend
    monkeypatch.setenv("IOT_RAW_BATCH_RETENTION_HOURS", "0")
    warehouse = _warehouse(postgres_db)
    loaded, not_loaded = fill(store, HOUR, seq=1)
    other_hour = fill(store, HOUR + dt.timedelta(hours=1), seq=5)
    resources = {"object_store": resource, "warehouse": warehouse}

    run = dg.materialize([raw_lake], partition_key="2026-11-20-10:00", resources=resources)
    metadata = materialization(run)
    assert metadata["status"] == "compacted" and metadata["rows"] == 24
    assert metadata["files"] == 1 and metadata["batches_held"] == 2
    late = fill(store, HOUR, seq=3, minutes=40)

    everything = stored_rows(store, [loaded, not_loaded, *late, *other_hour])
    ledger = [(loaded, "2026-11-20-10:00")] + [(k, "2026-11-20-10:00") for k in late]
    ledger += [(k, "2026-11-20-11:00") for k in other_hour]
    with warehouse.connect() as conn:
        migrate(conn)
        for key, partition in ledger:
            conn.execute(
                "INSERT INTO ingest_batches (object_key, partition_key, raw_rows, "
                "telemetry_rows, event_rows, reject_rows, duplicate_rows, loaded_at) "
                "VALUES (%s, %s, 0, 0, 0, 0, 0, now() - interval '1 hour')",
                [key, partition],
            )
        conn.commit()

    run = dg.materialize([raw_batch_retention], resources=resources)
    metadata = materialization(run)
    assert metadata["deleted_batches"] == 1
    assert metadata["kept_by_reason"] == {
        "not loaded": 1,
        "late: not in the compacted hour yet": 2,
        "not compacted": 2,
    }
    assert keys_under(store, KEY_ROOT) == {not_loaded, *late, *other_hour}
    (check,) = run.get_asset_check_evaluations()
    assert check.check_name == LIFECYCLE_CLEAR and not check.passed
    assert check.metadata["uncompacted_hours"].value == ["2026-11-20-11:00"]
    assert check.metadata["hours_with_late_batches"].value == ["2026-11-20-10:00"]
    assert read_back(HOUR, HOUR + dt.timedelta(hours=2)) == everything

    open_run = dg.materialize(
        [raw_lake],
        partition_key=f"{dt.datetime.now(dt.UTC):%Y-%m-%d-%H}:00",
        resources=resources,
        raise_on_error=False,
    )
    assert not open_run.success


def test_a_retention_pass_steps_over_empty_hours_and_foreign_keys(backend):
    store, _ = backend
    store.put(KEY_ROOT + "README.parquet", b"not a batch")  # sorts before every date=
    month_later = HOUR + dt.timedelta(days=30)
    fill(store, HOUR, seq=1)
    fill(store, month_later, seq=2)
    assert lake.next_batch_hour(store) == HOUR
    assert lake.next_batch_hour(store, HOUR) == month_later
    assert lake.next_batch_hour(store, month_later) is None
    report = expire_raw_batches(
        store, lambda _partition: {}, month_later + dt.timedelta(days=1), retention=LATENESS
    )
    assert report.hours_scanned == 2
    assert report.uncompacted_hours == ["2026-11-20-10:00", "2026-12-20-10:00"]


def test_the_sensor_requests_closed_hours_with_batches_no_manifest_holds(backend):
    store, resource = backend
    now = dt.datetime.now(dt.UTC)
    closed = lake.hour_start(now) - dt.timedelta(hours=3)
    fill(store, closed, seq=1)
    fill(store, lake.hour_start(now), seq=2)  # the open hour: not yet
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"object_store": resource})
        result = raw_lake_compaction_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == [f"{closed:%Y-%m-%d-%H}:00"]
        compact_hour(store, closed, now, lateness=LATENESS, max_rows=1000)
        assert isinstance(raw_lake_compaction_sensor(context), dg.SkipReason)
        fill(store, closed, seq=3, minutes=45)  # late: the hour is requested again
        again = raw_lake_compaction_sensor(context)
        assert isinstance(again, dg.SensorResult)
        assert [r.partition_key for r in again.run_requests] == [f"{closed:%Y-%m-%d-%H}:00"]
        assert again.run_requests[0].run_key != result.run_requests[0].run_key
