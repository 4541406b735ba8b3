"""The Dagster pipeline on real PostgreSQL and real object stores: sensor, live load,
backfill, rollups — materialised through Dagster with a real (temporary) instance."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from iot_platform.defs.health.checks import device_health_checks, device_health_job
from iot_platform.defs.ingest.raw_batches import raw_batches
from iot_platform.defs.keys import TELEMETRY_1D, TELEMETRY_1H, TELEMETRY_1M
from iot_platform.defs.resources import ObjectStoreResource, WarehouseResource
from iot_platform.defs.warehouse import load, rollups
from iot_platform.defs.warehouse.jobs import load_job
from iot_platform.defs.warehouse.sensors import raw_batch_sensor
from iot_platform.discovery import Cursor, discover
from iot_platform.objectstore import LocalDirectoryStore, S3Store
from iot_platform.rawbatch import BatchKey
from iot_platform.warehouse import follow
from tests.warehouse_data import envelope, put_batch, telemetry_messages

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=dt.UTC)
HOURS = ("2026-11-22-08:00", "2026-11-22-09:00")
DEVICES = [f"dev-{n}" for n in range(4)]
ASSETS = [raw_batches, load.load_raw_batches, *dg.load_assets_from_modules([rollups])]


def _warehouse(conninfo: str) -> WarehouseResource:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    return WarehouseResource(
        host=params["host"],
        port=int(params["port"]),
        user=params["user"],
        password=params["password"],
        dbname=params["dbname"],
    )


def _fill_hours(store, seq0: int = 0, hours: tuple[str, ...] = HOURS) -> list[str]:
    """Three batches per hour (default HOURS); returns their keys."""
    keys = []
    for h, hour in enumerate(hours):
        start = dt.datetime.strptime(hour, "%Y-%m-%d-%H:%M").replace(tzinfo=dt.UTC)
        for b in range(3):
            messages = telemetry_messages(
                DEVICES,
                start + dt.timedelta(minutes=15 * b),
                30,
                seed=h * 10 + b,
                first_seq=(h * 3 + b) * 30,  # new messages: seq goes on across batches
            )
            keys.append(put_batch(store, messages, seq=seq0 + h * 3 + b).key)
    return keys


def pipeline_resources(conninfo: str, objects_dir: Path) -> dict:
    """The pipeline's resources on a fresh warehouse with DEVICES registered."""
    warehouse = _warehouse(conninfo)
    with warehouse.connect() as conn:
        conn.execute("INSERT INTO devices (device_id) SELECT unnest(%s::text[])", [DEVICES])
    return {
        "warehouse": warehouse,
        "object_store": ObjectStoreResource(backend="local", local_dir=str(objects_dir)),
    }


@pytest.fixture
def resources(postgres_db, tmp_path):
    return pipeline_resources(postgres_db, tmp_path / "objects")


def _materialize(resources, instance, partition, keys=None):
    config = {"ops": {"load_raw_batches": {"config": {"batch_keys": keys or []}}}}
    result = dg.materialize(
        ASSETS,
        partition_key=partition,
        run_config=config,
        resources=resources,
        instance=instance,
        selection=dg.AssetSelection.all() - dg.AssetSelection.assets(raw_batches.key),
    )
    assert result.success
    return result


def _snapshot(conn) -> dict:
    return {
        "telemetry": conn.execute(
            "SELECT count(*), round(sum(value)::numeric, 4) FROM telemetry"
        ).fetchone(),
        "rollup_1h": conn.execute(
            "SELECT bucket, device_id, metric, count, round(avg::numeric, 6), min, max"
            " FROM telemetry_1h ORDER BY 1, 2, 3"
        ).fetchall(),
        "direct_1h": conn.execute(
            "SELECT date_trunc('hour', ts), device_id, metric, count(*),"
            " round(avg(value)::numeric, 6), min(value), max(value)"
            " FROM telemetry GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).fetchall(),
        "batches": conn.execute("SELECT count(*) FROM ingest_batches").fetchone()[0],
    }


def test_live_load_then_two_hour_backfill_is_idempotent(resources, tmp_path):
    store = resources["object_store"].store()
    keys = _fill_hours(store)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        # Live path: the sensor's manifest, one run per hour.
        for hour in HOURS:
            manifest = [k for k in keys if BatchKey.parse(k).partition_key == hour]
            result = _materialize(resources, instance, hour, manifest)
        metadata = result.asset_materializations_for_node("load_raw_batches")[0].metadata
        assert metadata["batches"].value == 3 and metadata["rows_loaded"].value == 3 * 30 * 4 * 3
        with resources["warehouse"].connect() as conn:
            live = _snapshot(conn)
        assert live["telemetry"][0] == 2 * 3 * 30 * 4 * 3
        assert live["rollup_1h"] == live["direct_1h"] and live["batches"] == 6

        # Backfill of both hours (no manifest: every batch of the hour), twice.
        for _ in range(2):
            for hour in HOURS:
                _materialize(resources, instance, hour)
        with resources["warehouse"].connect() as conn:
            assert _snapshot(conn) == live
            assert conn.execute("SELECT min(load_count) FROM ingest_batches").fetchone() == (3,)


def test_manifest_keys_outside_the_partition_fail_clearly(resources, tmp_path):
    keys = _fill_hours(resources["object_store"].store())
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        config = {"ops": {"load_raw_batches": {"config": {"batch_keys": keys}}}}
        result = dg.materialize(
            [load.load_raw_batches],
            partition_key=HOURS[0],
            run_config=config,
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "not in partition 2026-11-22-08:00" in failure.message


def _many_objects(store, count: int) -> list[str]:
    keys = []
    for n in range(count):
        at = NOW - dt.timedelta(hours=30) + dt.timedelta(seconds=40 * n)
        if at > NOW:
            break
        key = BatchKey(at, "bulk", n).key
        store.put(key, b"x")
        keys.append(key)
    return keys


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sensor_discovery_over_thousands_of_objects(backend, tmp_path, s3_server):
    if backend == "local":
        store = LocalDirectoryStore(tmp_path / "objects")
    else:
        store = S3Store(
            s3_server.endpoint,
            s3_server.access_key,
            s3_server.secret_key,
            f"disc-{backend}-{time.monotonic_ns() % 10**6}",
        )
        store.ensure_ready()
    keys = _many_objects(store, 2800)
    in_lookback = [
        k for k in keys if BatchKey.parse(k).first_received_at >= NOW - dt.timedelta(hours=24)
    ]

    started = time.monotonic()
    first = discover(store, Cursor(), NOW, max_keys=1000)
    elapsed = time.monotonic() - started
    print(f"{backend}: listed {first.listed} objects in {elapsed:.2f}s")
    assert elapsed < 10
    assert first.capped and first.new_keys == 1000
    got = [k for p in sorted(first.by_partition) for k in first.by_partition[p]]
    assert got == in_lookback[:1000]
    assert all(
        k.startswith(f"raw/v1/date={p[:10]}/hour={p[11:13]}/")
        for p, ks in first.by_partition.items()
        for k in ks
    )

    cursor, requested = first.cursor, list(got)
    while True:
        step = discover(store, cursor, NOW, max_keys=1000)
        if not step.new_keys:
            break
        requested += [k for p in sorted(step.by_partition) for k in step.by_partition[p]]
        cursor = step.cursor
    assert sorted(requested) == in_lookback  # each exactly once

    # A late batch (older key than the cursor, inside the lateness window) is still found.
    late = BatchKey(NOW - dt.timedelta(minutes=5, microseconds=1), "late", 1).key
    store.put(late, b"x")
    again = discover(store, cursor, NOW)
    assert [k for ks in again.by_partition.values() for k in ks] == [late]


def test_sensor_requests_one_run_per_hour_with_its_manifest(resources):
    store = resources["object_store"].store()
    # A first tick looks back 24 h: the hours must be recent relative to the real clock.
    now = dt.datetime.now(dt.UTC)
    recent = tuple(f"{now - dt.timedelta(hours=h):%Y-%m-%d-%H}:00" for h in (3, 2))
    keys = _fill_hours(store, hours=recent)
    now_keys = []
    for n, delta in enumerate((dt.timedelta(minutes=2), dt.timedelta(seconds=30))):
        info = put_batch(store, telemetry_messages(DEVICES[:1], now - delta, 1), seq=100 + n)
        now_keys.append(info.key)
    instance = dg.DagsterInstance.ephemeral()
    context = dg.build_sensor_context(resources=resources, instance=instance)
    result = raw_batch_sensor(context)
    assert isinstance(result, dg.SensorResult)
    by_partition = {r.partition_key: r for r in result.run_requests}
    expected = {BatchKey.parse(k).partition_key for k in [*keys, *now_keys]}
    assert set(by_partition) == expected
    for partition, request in by_partition.items():
        manifest = request.run_config["ops"]["load_raw_batches"]["config"]["batch_keys"]
        assert manifest == sorted(
            k for k in [*keys, *now_keys] if BatchKey.parse(k).partition_key == partition
        )
    again = raw_batch_sensor(
        dg.build_sensor_context(resources=resources, cursor=result.cursor, instance=instance)
    )
    assert not again.run_requests
    assert again.skip_reason and "0 new batches" in again.skip_reason.skip_message


def _manifest(request: dg.RunRequest) -> list[str]:
    return request.run_config["ops"]["load_raw_batches"]["config"]["batch_keys"]


def test_sensor_holds_new_keys_while_the_hours_run_is_in_flight(resources):
    """Coalescing: one queued-or-running load per hour; keys found meanwhile wait in the
    cursor and all go into the hour's next run."""
    store = resources["object_store"].store()
    instance = dg.DagsterInstance.ephemeral()
    job = dg.Definitions(assets=ASSETS, jobs=[load_job], resources=resources).resolve_job_def(
        load_job.name
    )
    now = dt.datetime.now(dt.UTC)

    def put(n: int) -> str:
        at = now - dt.timedelta(seconds=60 - n)
        return put_batch(store, telemetry_messages(DEVICES[:1], at, 1), seq=200 + n).key

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(resources=resources, cursor=cursor, instance=instance)
        return raw_batch_sensor(context)

    first_key = put(0)
    partition = BatchKey.parse(first_key).partition_key
    first = tick(None)
    assert [_manifest(r) for r in first.run_requests] == [[first_key]]
    # The daemon launched the requested run; it has not finished when new batches land.
    running = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": partition}
    )
    later = [put(n) for n in (1, 2, 3)]
    held = tick(first.cursor)
    assert not held.run_requests
    assert "3 batches" in held.skip_reason.skip_message
    assert Cursor.loads(held.cursor).pending == {partition: later}
    still = tick(held.cursor)  # nothing new, still in flight: still waiting, nothing lost
    assert not still.run_requests and Cursor.loads(still.cursor).pending == {partition: later}

    instance.delete_run(running.run_id)  # the run is over (its status no longer in flight)
    released = tick(still.cursor)
    assert [(r.partition_key, _manifest(r)) for r in released.run_requests] == [(partition, later)]
    assert Cursor.loads(released.cursor).pending == {}
    assert not tick(released.cursor).run_requests  # each key requested exactly once


def test_an_out_of_range_device_never_holds_back_the_rollups(resources, tmp_path):
    """Health is off the data path: the load job refreshes all three rollups whatever a
    device reads, and device_health_job (its own run) reports the device."""
    store = resources["object_store"].store()
    start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=5)
    messages = telemetry_messages(DEVICES[:2], start, 5)
    # 99 kV on a DC meter: outside any device type's bounds (the protocol's reach ~4 kV).
    wild = envelope(DEVICES[3], 1, start, {"voltage_dc": 99_000.0})
    messages.append((start + dt.timedelta(seconds=1), f"iot/{DEVICES[3]}/telemetry", wild))
    key = put_batch(store, messages, seq=1).key
    partition = BatchKey.parse(key).partition_key
    defs = dg.Definitions(
        assets=ASSETS,
        asset_checks=[device_health_checks],
        jobs=[load_job, device_health_job],
        resources=resources,
    )
    config = {"ops": {"load_raw_batches": {"config": {"batch_keys": [key]}}}}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        loaded = defs.resolve_job_def(load_job.name).execute_in_process(
            partition_key=partition, run_config=config, instance=instance
        )
        assert loaded.success
        refreshed = {event.asset_key for event in loaded.get_asset_materialization_events()}
        assert {TELEMETRY_1M, TELEMETRY_1H, TELEMETRY_1D} <= refreshed
        assert not loaded.get_asset_check_evaluations()  # no health check inside a load

        health = defs.resolve_job_def(device_health_job.name).execute_in_process(
            instance=instance, raise_on_error=False
        )
    (evaluation,) = [
        e for e in health.get_asset_check_evaluations() if e.check_name == "values_out_of_range"
    ]
    assert not evaluation.passed
    assert evaluation.metadata["failing_device_ids"].value == [DEVICES[3]]
    with resources["warehouse"].connect() as conn:
        devices_1d = {row[0] for row in conn.execute("SELECT DISTINCT device_id FROM telemetry_1d")}
    assert devices_1d == {*DEVICES[:2], DEVICES[3]}


def test_a_following_run_loads_batches_that_land_after_its_manifest(
    resources, tmp_path, monkeypatch
):
    """The live path's run keeps loading its hour's new batches (``follow_s``) and
    refreshes the rollups beside the load; the sensor then drops those keys from its cursor
    instead of requesting another run for them; a manifest of loaded batches loads nothing
    again."""
    monkeypatch.setattr(follow, "ROLLUP_EVERY_S", 1.0)
    store = resources["object_store"].store()
    now = dt.datetime.now(dt.UTC)
    if now.minute == 59 and now.second > 30:  # the run must not reach the end of its hour
        time.sleep(61 - now.second)
        now = dt.datetime.now(dt.UTC)

    def put(n: int) -> str:
        at = now + dt.timedelta(milliseconds=n)
        return put_batch(store, telemetry_messages(DEVICES[:2], at, 2), seq=300 + n).key

    first = put(0)
    partition = BatchKey.parse(first).partition_key
    job = dg.Definitions(assets=ASSETS, jobs=[load_job], resources=resources).resolve_job_def(
        load_job.name
    )
    results: list[dg.ExecuteInProcessResult] = []

    def run(keys: list[str], follow_s: float) -> None:
        config = {"batch_keys": keys, "follow_s": follow_s}
        results.append(
            job.execute_in_process(
                partition_key=partition,
                run_config={"ops": {"load_raw_batches": {"config": config}}},
                instance=instance,
            )
        )

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        follower = threading.Thread(target=run, args=([first], 8.0))
        follower.start()
        time.sleep(3)
        later = [put(1), put(2)]
        follower.join(timeout=60)
        (followed,) = results
        assert followed.success
        metadata = followed.asset_materializations_for_node("load_raw_batches")[0].metadata
        assert metadata["batches"].value == 3
        assert "IOT_LOAD_FOLLOW_S" in metadata["follow_ended"].value
        # The rollups were refreshed beside the load: nothing was left for their steps.
        assert metadata["batches_rolled_up_while_following"].value == 3
        (rollup,) = [
            event.materialization.metadata
            for event in followed.get_asset_materialization_events()
            if event.asset_key == TELEMETRY_1M
        ]
        assert rollup["reason"].value == "nothing left to refresh"
        with resources["warehouse"].connect() as conn:
            snapshot = _snapshot(conn)
        assert snapshot["rollup_1h"] == snapshot["direct_1h"] and snapshot["telemetry"][0] > 0
        with resources["warehouse"].connect() as conn:
            ledger = dict(
                conn.execute(
                    "SELECT object_key, dagster_run_id FROM ingest_batches"
                    " WHERE object_key = ANY(%s)",
                    [[first, *later]],
                ).fetchall()
            )
        assert ledger == dict.fromkeys([first, *later], followed.run_id)

        # The sensor had seen the later keys while the run was in flight: it drops them.
        cursor = Cursor(last_key=later[-1], recent=[first, *later], pending={partition: later})
        tick = raw_batch_sensor(
            dg.build_sensor_context(resources=resources, cursor=cursor.dumps(), instance=instance)
        )
        assert not tick.run_requests
        assert Cursor.loads(tick.cursor).pending == {}
        assert "2 batches already loaded" in tick.skip_reason.skip_message

        # The hour's next run: its manifest and what its listing finds were loaded by
        # the previous run; nothing is loaded twice.
        run([first], 2.0)
        assert (
            results[-1]
            .asset_materializations_for_node("load_raw_batches")[0]
            .metadata["batches"]
            .value
            == 0
        )
