"""Device-health checks flag each injected fault with the right device id, and only it."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg.types.json import Jsonb

from iot_platform.defs.health.checks import device_health_checks
from iot_platform.defs.keys import TELEMETRY_1D
from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.defs.warehouse import load, rollups
from iot_platform.health import PLATFORM, RULES, HealthSettings, evaluate
from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.rawbatch import BatchKey, read_batch
from iot_platform.settings import SettingsError
from iot_platform.warehouse.aggregates import refresh
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from iot_platform.warehouse.migrations import Dialect, migrate
from tests.fixtures.ingest import ingest_env, local_store_env, wait_for_rows
from tests.integration.test_pipeline import (
    ASSETS,
    HOURS,
    _fill_hours,
    _materialize,
    _warehouse,
    pipeline_resources,
)
from tests.mqtt_helpers import device_session
from tests.warehouse_data import envelope, put_batch, telemetry_messages

pytestmark = pytest.mark.integration

RULE = {rule.name: rule for rule in RULES}
DEVICE_RULES = [rule for rule in RULES if rule.scope == "device"]

GOOD = ["dev-good", "dev-gap", "dev-dup", "dev-range", "dev-skew", "dev-reject"]
EXPECTED = {
    "silent_devices": {"dev-silent", "dev-never"},
    "sequence_gaps_duplicates": {"dev-gap", "dev-dup"},
    "values_out_of_range": {"dev-range"},
    "clock_skew": {"dev-skew"},
    "decode_reject_rate": {"dev-reject"},
    "certificate_expiring": {"dev-gap"},  # its only certificate ends in 10 days
    "pipeline_lag": set(),  # everything was received just now
}


def _load_objects(conn: psycopg.Connection, store, infos) -> None:
    """Load stored raw batches in order, as the pipeline's load step does."""
    for info in infos:
        load_object(
            conn,
            store,
            info,
            run_id="r",
            parameters=load_parameters(conn),
            devices=known_devices(conn),
            max_payload_bytes=262144,
        )


def _faulty_fleet(store, now: dt.datetime) -> list:
    start = now - dt.timedelta(minutes=5)
    messages = [
        m
        for m in telemetry_messages(GOOD, start, 30)
        # dev-gap loses seq 10..12 on the way
        if not (
            m[1] == "iot/dev-gap/telemetry"
            and b'"seq": 1' in m[2]
            and any(f'"seq": {n},'.encode() in m[2] for n in (10, 11, 12))
        )
    ]
    messages += telemetry_messages(["dev-silent"], now - dt.timedelta(minutes=50), 3)
    messages.append(
        (
            now - dt.timedelta(seconds=5),
            "iot/dev-range/telemetry",
            envelope("dev-range", 30, now - dt.timedelta(seconds=5), {"voltage_dc": 5000.0}),
        )
    )
    messages.append(
        (
            now,
            "iot/dev-skew/telemetry",
            envelope("dev-skew", 30, now - dt.timedelta(minutes=10), {"power_dc": 1.0}),
        )
    )
    messages += [(now, "iot/dev-reject/telemetry", b"{not json") for _ in range(5)]
    first = [m for m in messages if m[1] == "iot/dev-dup/telemetry"][:5]
    batches = [put_batch(store, messages, seq=1), put_batch(store, first, seq=2)]  # redelivery
    return batches


@pytest.fixture
def fleet(postgres_db, tmp_path):
    warehouse = _warehouse(postgres_db)
    store = ObjectStoreResource(backend="local", local_dir=str(tmp_path / "o")).store()
    now = dt.datetime.now(dt.UTC)
    with warehouse.connect() as conn:
        conn.execute(
            "INSERT INTO devices (device_id) SELECT unnest(%s::text[])",
            [[*GOOD, "dev-silent", "dev-never"]],
        )
        conn.execute(
            """INSERT INTO device_certificates
                   (serial_hex, device_id, fingerprint_sha256, not_before, not_after)
               VALUES ('a1', 'dev-gap', 'f1', %(now)s, %(now)s + interval '10 days'),
                      ('a2', 'dev-good', 'f2', %(now)s, %(now)s + interval '10 days'),
                      ('a3', 'dev-good', 'f3', %(now)s, %(now)s + interval '300 days')""",
            {"now": now},
        )
        conn.commit()
        _load_objects(conn, store, _faulty_fleet(store, now))
    return warehouse


def test_each_rule_flags_exactly_the_faulty_devices(fleet):
    settings = HealthSettings.from_env()
    with fleet.connect() as conn:
        results = {rule.name: evaluate(conn, rule, settings) for rule in RULES}
        history = conn.execute(
            "SELECT check_name, status, count(*) FROM device_health GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
    assert {name: set(r.failing) for name, r in results.items()} == EXPECTED
    gap = results["sequence_gaps_duplicates"].failing
    assert gap["dev-gap"]["missing_seq"] == 3 and gap["dev-dup"]["duplicates"] == 5
    assert results["values_out_of_range"].failing["dev-range"]["voltage_dc"]["max"] == 5000.0
    assert results["decode_reject_rate"].failing["dev-reject"]["reasons"] == {"malformed_json": 5}
    # one history row per registered device and device rule (pipeline_lag is the platform's)
    assert sum(n for _, _, n in history) == len(DEVICE_RULES) * 8


def test_reject_rate_counts_the_rejecting_devices_accepted_messages(fleet):
    """Accepted messages are counted only for devices with rejects, and exactly."""
    with fleet.connect() as conn:
        failing = evaluate(conn, RULE["decode_reject_rate"], HealthSettings.from_env()).failing
        accepted = conn.execute(
            "SELECT count(*) FROM device_messages WHERE device_id = 'dev-reject'"
        ).fetchone()[0]
    assert accepted > 0
    assert failing == {
        "dev-reject": {
            "rejects": 5,
            "accepted_messages": accepted,
            "reject_rate": round(5 / (5 + accepted), 4),
            "reasons": {"malformed_json": 5},
        }
    }


def test_checks_through_dagster_report_failing_ids_and_severity(fleet, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        defs = dg.Definitions(asset_checks=[device_health_checks], resources={"warehouse": fleet})
        job = dg.define_asset_job("health", selection=dg.AssetSelection.all_asset_checks())
        result = (
            dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
            .resolve_job_def("health")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        ev = evaluations[name]
        assert ev.passed == (not expected)
        assert set(ev.metadata["failing_device_ids"].value) == expected
    assert evaluations["values_out_of_range"].severity == dg.AssetCheckSeverity.ERROR
    assert evaluations["clock_skew"].severity == dg.AssetCheckSeverity.WARN


# ---- bounds by device type (issue 12, items 1 and 2) -----------------------------------

# device id -> (device type, metadata, metric, value)
BOUNDED = {
    "ac-25kv": ("meter-ac", {}, "voltage_ac", 25_000.0),  # a 25 kV rail meter: fine
    "ac-230v": ("meter-ac", {}, "voltage_ac", 230.0),  # below the type's 24 kV
    "dc-3kv": ("meter-dc", {}, "voltage_dc", 3_000.0),  # DC traction: fine
    "dc-5kv": ("meter-dc", {}, "voltage_dc", 5_000.0),  # above the type's 4 kV
    "gen-25kv": ("generic", {}, "voltage_ac", 25_000.0),  # inside the protocol's envelope
    # own bounds: as `--meta health_bounds=...` stores them (JSON text), or a JSON object
    "dc-own": ("meter-dc", {"health_bounds": '{"voltage_dc": [0, 900]}'}, "voltage_dc", 1_000.0),
    "dc-own-obj": ("meter-dc", {"health_bounds": {"voltage_dc": [0, 5000]}}, "voltage_dc", 4_500.0),
    "dc-bad": ("meter-dc", {"health_bounds": "[0, 900"}, "voltage_dc", 700.0),
}


@pytest.fixture
def bounded_fleet(postgres_db, tmp_path):
    warehouse = _warehouse(postgres_db)
    store = LocalDirectoryStore(tmp_path / "o")
    now = dt.datetime.now(dt.UTC)
    with warehouse.connect() as conn:
        for device_id, (device_type, metadata, _, _) in BOUNDED.items():
            conn.execute(
                "INSERT INTO devices (device_id, device_type, metadata) VALUES (%s, %s, %s)",
                [device_id, device_type, Jsonb(metadata)],
            )
        conn.commit()
        messages = [
            (now, f"iot/{d}/telemetry", envelope(d, 1, now, {metric: value}))
            for d, (_, _, metric, value) in BOUNDED.items()
        ]
        _load(conn, store, messages)
    return warehouse


def _load(conn: psycopg.Connection, store, messages: list, seq: int = 1) -> None:
    """Write ``messages`` as one raw batch and load it."""
    _load_objects(conn, store, [put_batch(store, messages, seq=seq)])


def test_bounds_belong_to_device_types_and_devices_and_never_stop_a_run(bounded_fleet, tmp_path):
    with bounded_fleet.connect() as conn:
        result = evaluate(conn, RULE["values_out_of_range"], HealthSettings.from_env())
        history = dict(
            conn.execute(
                "SELECT device_id, status FROM device_health"
                " WHERE check_name = 'values_out_of_range'"
            ).fetchall()
        )
    failing = result.failing
    assert set(failing) == {"ac-230v", "dc-5kv", "dc-own", "dc-bad"}
    assert failing["ac-230v"]["voltage_ac"]["allowed"] == [24_000.0, 26_000.0]
    assert failing["ac-230v"]["voltage_ac"]["bounds_from"] == "device type meter-ac"
    assert failing["dc-5kv"]["voltage_dc"]["allowed"] == [0.0, 4_000.0]
    assert failing["dc-own"]["voltage_dc"] == {
        "rows": 1,
        "min": 1000.0,
        "max": 1000.0,
        "allowed": [0.0, 900.0],
        "bounds_from": "device metadata",
    }
    # an invalid override is itself the finding; the device is judged by its type's bounds
    assert list(failing["dc-bad"]) == ["invalid_bounds_override"]
    assert "health_bounds" in failing["dc-bad"]["invalid_bounds_override"]
    assert history == {d: "error" if d in failing else "ok" for d in BOUNDED}

    # Through Dagster: the findings fail their (ERROR) check, the run itself succeeds.
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        defs = dg.Definitions(
            asset_checks=[device_health_checks], resources={"warehouse": bounded_fleet}
        )
        job = dg.define_asset_job("health", selection=dg.AssetSelection.all_asset_checks())
        run = (
            dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
            .resolve_job_def("health")
            .execute_in_process(instance=instance)
        )
    assert run.success
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert set(checks["values_out_of_range"].metadata["failing_device_ids"].value) == set(failing)


@pytest.mark.parametrize(
    ("bounds", "flagged"),
    [
        # ints for a metric every device type uses: the partial set crashed with psycopg's
        # "cannot dump lists of mixed types" against the float defaults
        ('{"voltage_ac": [0, 30000]}', {"dc-5kv", "dc-own", "dc-bad"}),
        ('{"voltage_dc": [0.0, 5500.5]}', {"ac-230v", "dc-own", "dc-bad"}),
        # one device type only, ints and floats mixed; the other metrics keep their defaults
        (
            '{"meter-ac": {"voltage_ac": [200, 26000.0]}, "humidity": [5, 95.5]}',
            {"dc-5kv", "dc-own", "dc-bad"},
        ),
    ],
)
def test_iot_health_bounds_merge_with_the_defaults(bounded_fleet, monkeypatch, bounds, flagged):
    monkeypatch.setenv("IOT_HEALTH_BOUNDS", bounds)
    settings = HealthSettings.from_env()
    assert settings.bounds.generic["frequency"] == (45.0, 65.0)  # untouched default
    with bounded_fleet.connect() as conn:
        result = evaluate(conn, RULE["values_out_of_range"], settings)
    assert set(result.failing) == flagged


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[0, 30000]", "must be a JSON object"),
        ('{"voltage_ac": [30000, 0]}', "min 30000 is above max 0"),
        ('{"voltage_ac": [0]}', "'voltage_ac' must be [min, max]"),
        ('{"voltage_ac": ["0", 1]}', "'voltage_ac' must be [min, max]"),
        ('{"voltage_ac": [0, true]}', "'voltage_ac' must be [min, max]"),
        ('{"voltage_ac": [0, NaN]}', "'voltage_ac' must be [min, max]"),
        ('{"meter-ac": {"voltage_ac": 5}}', "device type 'meter-ac': 'voltage_ac' must be"),
    ],
)
def test_invalid_iot_health_bounds_are_named(monkeypatch, bounds, message):
    monkeypatch.setenv("IOT_HEALTH_BOUNDS", bounds)
    with pytest.raises(SettingsError, match="IOT_HEALTH_BOUNDS") as raised:
        HealthSettings.from_env()
    assert message in str(raised.value)


def test_up_refuses_invalid_health_settings_before_starting_anything(stack_env):
    env = {**stack_env, "IOT_HEALTH_BOUNDS": '{"voltage_ac": [0, 30000'}
    up = subprocess.Popen(
        [sys.executable, "-m", "iot_platform.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = up.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGINT)  # it is starting the stack: let it stop its children
        _out, err = up.communicate(timeout=120)
        pytest.fail(f"`up` started despite the bad setting:\n{err[-2000:]}")
    assert up.returncode == 2, err[-2000:]
    assert "iot-platform: error: IOT_HEALTH_BOUNDS is not valid JSON" in err
    assert not Path(env["IOT_HOME"]).exists()  # nothing was started or created


# ---- presence and silence (items 3 and 5) ----------------------------------------------


def _status(device_id: str, ts: dt.datetime, status: str, seq: int) -> bytes:
    return json.dumps(
        {"v": 2, "device_id": device_id, "ts": ts.isoformat(), "seq": seq}
        | {"msg_type": "status", "status": status}
    ).encode()


def test_presence_is_ordered_by_receive_time(postgres_db, tmp_path):
    """A last will carries the time the device connected: older than its online message."""
    warehouse = _warehouse(postgres_db)
    store = LocalDirectoryStore(tmp_path / "o")
    now = dt.datetime.now(dt.UTC)
    connected = now - dt.timedelta(seconds=40)
    reconnected = now - dt.timedelta(seconds=5)
    messages = [
        # gone: online on connect, its last will (stamped at connect) 20 s later
        (connected, "iot/gone/status", _status("gone", connected, "online", 1)),
        (
            now - dt.timedelta(seconds=20),
            "iot/gone/status",
            _status("gone", connected, "offline", 1),
        ),
        # back: the same, then it reconnected
        (connected, "iot/back/status", _status("back", connected, "online", 1)),
        (
            now - dt.timedelta(seconds=20),
            "iot/back/status",
            _status("back", connected, "offline", 1),
        ),
        (reconnected, "iot/back/status", _status("back", reconnected, "online", 2)),
    ]
    with warehouse.connect() as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES ('gone'), ('back')")
        conn.commit()
        _load(conn, store, messages)
        result = evaluate(conn, RULE["silent_devices"], HealthSettings.from_env(), now)
    assert set(result.failing) == {"gone"}
    assert result.failing["gone"]["last_status"] == "offline"


def test_silence_is_judged_against_what_was_received_and_lag_is_its_own_finding(
    postgres_db, tmp_path
):
    """Loads lag 10 minutes behind the wall clock: the devices that kept publishing until
    the newest loaded message are not silent; the lag is reported once, for the platform."""
    warehouse = _warehouse(postgres_db)
    store = LocalDirectoryStore(tmp_path / "o")
    now = dt.datetime.now(dt.UTC)
    newest = now - dt.timedelta(minutes=10)
    busy = ["lag-a", "lag-b", "lag-c"]
    messages = telemetry_messages(busy, newest - dt.timedelta(minutes=2), 12)
    messages += telemetry_messages(["lag-quiet"], newest - dt.timedelta(minutes=8), 3)
    with warehouse.connect() as conn:
        conn.execute(
            "INSERT INTO devices (device_id) SELECT unnest(%s::text[])", [[*busy, "lag-quiet"]]
        )
        conn.commit()
        _load(conn, store, messages)
        settings = HealthSettings.from_env()
        silent = evaluate(conn, RULE["silent_devices"], settings, now)
        lag = evaluate(conn, RULE["pipeline_lag"], settings, now)
        rows = conn.execute(
            "SELECT count(*) FROM device_health WHERE check_name = 'pipeline_lag'"
        ).fetchone()[0]
    assert set(silent.failing) == {"lag-quiet"}
    assert silent.failing["lag-quiet"]["silent_for_s"] > 300
    assert set(lag.failing) == {PLATFORM}
    assert 590 < lag.failing[PLATFORM]["lag_s"] < 700
    assert lag.failing[PLATFORM]["limit_s"] == 120
    assert rows == 0  # not a device's finding: no device_health rows

    # The loads catch up: no lag; the quiet device is still the only silent one.
    with warehouse.connect() as conn:
        _load(conn, store, telemetry_messages(busy, now - dt.timedelta(seconds=30), 3), seq=2)
        assert not evaluate(conn, RULE["pipeline_lag"], settings, now).failing
        assert set(evaluate(conn, RULE["silent_devices"], settings, now).failing) == {"lag-quiet"}


# ---- retained replays (item 4) ---------------------------------------------------------


def test_retained_replay_after_ingest_restart_is_not_activity(
    mosquitto, ingest_factory, postgres_db, tmp_path
):
    """The broker re-sends a retained last will to the restarted daemon's new subscription
    (raw retain flag set): stored as before, but devices.last_seen must not jump."""
    device_id = f"ret-{secrets.token_hex(4)}"
    mosquitto.ca.issue_device_certificate(device_id)
    store = LocalDirectoryStore(tmp_path / "objects")
    env = ingest_env(
        mosquitto,
        tmp_path / "spool",
        INGEST_INSTANCE_ID=f"retain-{device_id}",
        **local_store_env(tmp_path / "objects"),
    )
    daemon = ingest_factory(env).start()
    device = device_session(mosquitto, device_id)
    assert device.connected.is_set(), device.reason
    sent_at = dt.datetime.now(dt.UTC)
    topic = f"iot/{device_id}/status"
    device.client.publish(
        topic, _status(device_id, sent_at, "offline", 1), qos=1, retain=True
    ).wait_for_publish(5)
    wait_for_rows(store, 1)
    assert daemon.terminate() == 0
    time.sleep(1.5)
    daemon.start()  # same identity and session: subscribes again, gets the retained will
    try:
        deadline = time.monotonic() + 30
        while not any(t == topic and r for t, r in zip(*_topic_retain(store), strict=True)):
            assert time.monotonic() < deadline, "retained message not replayed"
            time.sleep(0.25)
    finally:
        device.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        device.close()
        assert daemon.terminate() == 0

    warehouse = _warehouse(postgres_db)
    with warehouse.connect() as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES (%s)", [device_id])
        conn.commit()
        _load_objects(conn, store, sorted(store.list("raw/v1/"), key=lambda i: i.key))
        last_seen = conn.execute(
            "SELECT last_seen FROM devices WHERE device_id = %s", [device_id]
        ).fetchone()[0]
        stored = conn.execute(
            "SELECT count(*) FROM device_events WHERE device_id = %s", [device_id]
        ).fetchone()[0]
    received = _received(store, topic)
    assert len(received) == 2 and received[0][1] is False and received[1][1] is True
    assert last_seen == received[0][0]  # the live message, not the replay 1.5 s later
    assert stored == 1  # the replay is the same event: stored once


def _topic_retain(store: LocalDirectoryStore) -> tuple[list[str], list[bool]]:
    rows = [read_batch(store.get(i.key)).table for i in store.list("raw/v1/")]
    topics = [t for table in rows for t in table.column("topic").to_pylist()]
    retain = [r for table in rows for r in table.column("retain").to_pylist()]
    return topics, retain


def _received(store: LocalDirectoryStore, topic: str) -> list[tuple[dt.datetime, bool]]:
    """(received_at, retain) of the non-empty messages on ``topic``, in receive order."""
    out = []
    for info in store.list("raw/v1/"):
        table = read_batch(store.get(info.key)).table.to_pylist()
        out += [
            (r["received_at"], r["retain"]) for r in table if r["topic"] == topic and r["payload"]
        ]
    return sorted(out)


# ---- values_out_of_range from the minute rollup (bounded cost) --------------------------

RANGE_NOW = dt.datetime(2026, 11, 30, 12, 0, 30, tzinfo=dt.UTC)  # window from 11:00:30


def _at(hh_mm_ss: str) -> dt.datetime:
    h, m, s = map(int, hh_mm_ss.split(":"))
    return RANGE_NOW.replace(hour=h, minute=m, second=s)


def _insert_batch(conn: psycopg.Connection, key: str, rows: list[tuple]) -> int:
    """One ledger row and its telemetry (device, "hh:mm:ss", value), as the load writes them
    (multi-row INSERTs: the TimescaleDB double has no COPY); returns the batch id."""
    times = [_at(t) for _, t, _ in rows]
    (batch_id,) = conn.execute(
        """INSERT INTO ingest_batches (object_key, partition_key, raw_rows, telemetry_rows,
               event_rows, reject_rows, duplicate_rows, min_ts, max_ts, refresh_from, refresh_to)
           VALUES (%s, '2026-11-30-11:00', %s, %s, 0, 0, 0, %s, %s, %s, %s)
           RETURNING batch_id""",
        [key, len(rows), len(rows), min(times), max(times), min(times), max(times)],
    ).fetchone()
    conn.execute(
        "INSERT INTO telemetry (ts, device_id, metric, value, batch_id)"
        " SELECT unnest(%s::timestamptz[]), unnest(%s::text[]), 'voltage_dc',"
        " unnest(%s::float8[]), %s",
        [times, [d for d, _, _ in rows], [v for _, _, v in rows], batch_id],
    )
    return batch_id


def _refresh_minutes(conn: psycopg.Connection, dialect: Dialect) -> None:
    """Refresh telemetry_1m over every batch and mark them all, as refresh_loaded does."""
    conn.commit()
    conn.autocommit = True
    try:
        refresh(conn, dialect, "telemetry_1m", _at("10:00:00"), _at("12:59:00"))
        conn.execute("UPDATE ingest_batches SET rollups_refreshed_at = now()")
    finally:
        conn.autocommit = False


def _out_of_range_through_the_rollup(conn: psycopg.Connection, dialect: Dialect) -> None:
    """The rule's findings when most of the window comes from telemetry_1m are the ones
    raw telemetry alone gives, including where the rollup's envelope is wider than the
    window (a rolled-up row before the window start in its first minute; a row a reload
    removed) and rows not rolled up yet."""
    conn.execute(
        "INSERT INTO devices (device_id) SELECT unnest(%s::text[])",
        [["oor-early", "oor-first", "oor-rolled", "oor-only-rolled", "oor-reloaded", "oor-new"]],
    )
    _insert_batch(
        conn,
        "b1",
        [
            ("oor-early", "11:00:10", 5000.0),  # same minute as the window start, before it
            ("oor-early", "11:00:40", 100.0),
            ("oor-first", "11:00:45", 4400.0),  # in the window's first, partial minute
            ("oor-rolled", "11:20:00", 4500.0),
            ("oor-rolled", "11:20:01", 10.0),
            ("oor-rolled", "11:25:00", 5.0),  # its minimum: a minute wholly within bounds
            ("oor-only-rolled", "11:10:00", 4100.0),
        ],
    )
    reloaded = _insert_batch(conn, "b2", [("oor-reloaded", "11:30:00", 4200.0)])
    _refresh_minutes(conn, dialect)
    # b2 reloaded after a decoder fix: its row is 42 V now; the rollup still holds 4200
    conn.execute("DELETE FROM telemetry WHERE batch_id = %s", [reloaded])
    conn.execute(
        "INSERT INTO telemetry (ts, device_id, metric, value, batch_id)"
        " VALUES (%s, 'oor-reloaded', 'voltage_dc', 42.0, %s)",
        [_at("11:30:00"), reloaded],
    )
    conn.execute(
        "UPDATE ingest_batches SET rollups_refreshed_at = NULL WHERE batch_id = %s", [reloaded]
    )
    # loaded, not rolled up yet
    _insert_batch(conn, "b3", [("oor-new", "11:59:50", -1.0), ("oor-rolled", "11:59:55", 4600.0)])
    conn.commit()

    rule, settings = RULE["values_out_of_range"], HealthSettings.from_env()
    failing = evaluate(conn, rule, settings, RANGE_NOW).failing
    generic = {"allowed": [0.0, 4000.0], "bounds_from": "generic"}
    assert failing == {
        "oor-first": {"voltage_dc": {"rows": 1, "min": 4400.0, "max": 4400.0} | generic},
        "oor-rolled": {"voltage_dc": {"rows": 2, "min": 5.0, "max": 4600.0} | generic},
        "oor-only-rolled": {"voltage_dc": {"rows": 1, "min": 4100.0, "max": 4100.0} | generic},
        "oor-new": {"voltage_dc": {"rows": 1, "min": -1.0, "max": -1.0} | generic},
    }
    # the same as from raw telemetry alone (no batch marked: nothing read from the rollup)
    conn.execute("UPDATE ingest_batches SET rollups_refreshed_at = NULL")
    assert evaluate(conn, rule, settings, RANGE_NOW).failing == failing


def test_out_of_range_reads_the_minute_rollup_exactly_on_postgresql(postgres_db):
    with psycopg.connect(postgres_db) as conn:
        migrate(conn, "postgresql")
        _out_of_range_through_the_rollup(conn, Dialect.POSTGRES)


def test_out_of_range_reads_the_minute_rollup_exactly_on_timescaledb(timescaledb):
    with timescaledb.schema("health") as (conn, _schema):
        migrate(conn, "timescaledb")
        _out_of_range_through_the_rollup(conn, Dialect.TIMESCALE)


@pytest.fixture
def resources(postgres_db, tmp_path):
    return pipeline_resources(postgres_db, tmp_path / "objects")


def test_rollup_steps_mark_the_batches_they_refreshed(resources, tmp_path):
    """A manifest-only run and a backfill refresh their rollups only in the rollup steps at
    the run's end (nothing beside the load): those steps mark the batches, so the
    out-of-range rule reads them from telemetry_1m instead of raw telemetry for ever."""
    store = resources["object_store"].store()
    keys = _fill_hours(store)
    hour = HOURS[0]
    manifest = [k for k in keys if BatchKey.parse(k).partition_key == hour]

    def unmarked(conn: psycopg.Connection) -> int:
        return conn.execute(
            "SELECT count(*) FROM ingest_batches WHERE rollups_refreshed_at IS NULL"
        ).fetchone()[0]

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = _materialize(resources, instance, hour, manifest)
        (daily,) = [
            e.materialization.metadata
            for e in result.get_asset_materialization_events()
            if e.asset_key == TELEMETRY_1D
        ]
        assert daily["batches_marked_refreshed"].value == len(manifest)
        with resources["warehouse"].connect() as conn:
            assert unmarked(conn) == 0
            # a backfill reloads the hour (clearing the marks), then marks it again
            _materialize(resources, instance, hour)
            assert unmarked(conn) == 0
            assert conn.execute("SELECT min(load_count) FROM ingest_batches").fetchone() == (2,)
            # a rollup materialised on its own (no batch loaded by its run) marks nothing
            conn.execute("UPDATE ingest_batches SET rollups_refreshed_at = NULL")
            conn.commit()
            dg.materialize(
                [*dg.load_assets_from_modules([rollups])],
                partition_key=hour,
                resources=resources,
                instance=instance,
            )
            assert unmarked(conn) == len(manifest)
            conn.execute("UPDATE ingest_batches SET rollups_refreshed_at = now()")
            conn.commit()
            # a run of a subset (the load and telemetry_1d only) did not refresh telemetry_1m
            later = [k for k in keys if BatchKey.parse(k).partition_key == HOURS[1]]
            dg.materialize(
                ASSETS,
                partition_key=HOURS[1],
                run_config={"ops": {"load_raw_batches": {"config": {"batch_keys": later}}}},
                resources=resources,
                instance=instance,
                selection=dg.AssetSelection.assets(load.load_raw_batches, TELEMETRY_1D),
            )
            assert unmarked(conn) == len(later)
