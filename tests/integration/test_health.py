"""Device-health checks flag each injected fault with the right device id, and only it."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from iot_platform.defs.checks import device_health_checks
from iot_platform.defs.resources import ObjectStoreResource
from iot_platform.health import RULES, HealthSettings, evaluate
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from tests.integration.test_pipeline import _warehouse
from tests.warehouse_data import envelope, put_batch, telemetry_messages

pytestmark = pytest.mark.integration

GOOD = ["dev-good", "dev-gap", "dev-dup", "dev-range", "dev-skew", "dev-reject"]
EXPECTED = {
    "silent_devices": {"dev-silent", "dev-never"},
    "sequence_gaps_duplicates": {"dev-gap", "dev-dup"},
    "values_out_of_range": {"dev-range"},
    "clock_skew": {"dev-skew"},
    "decode_reject_rate": {"dev-reject"},
    "certificate_expiring": {"dev-gap"},  # its only certificate ends in 10 days
}


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
        for info in _faulty_fleet(store, now):
            load_object(
                conn,
                store,
                info,
                run_id="r",
                parameters=load_parameters(conn),
                devices=known_devices(conn),
                max_payload_bytes=262144,
            )
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
    # one history row per registered device and rule
    assert sum(n for _, _, n in history) == len(RULES) * 8


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
        assert not ev.passed
        assert set(ev.metadata["failing_device_ids"].value) == expected
    assert evaluations["values_out_of_range"].severity == dg.AssetCheckSeverity.ERROR
    assert evaluations["clock_skew"].severity == dg.AssetCheckSeverity.WARN
