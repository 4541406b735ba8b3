"""The alert sensor against real check evaluations and a real HTTP receiver on loopback.

The device-health checks run through Dagster on a real warehouse with a device whose
clock is 10 minutes off; the sensor reads their evaluations from the instance and posts
to a webhook and to a Slack-API-shaped endpoint on loopback (slack_sdk's own client, from
dagster-slack). One message per transition, one on recovery, none while nothing changes,
a failed delivery retried, and no token or webhook URL in a payload or a log line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import psycopg
import pytest

from iot_platform.defs.alerts.sensor import check_alerts_sensor
from iot_platform.defs.health.checks import device_health_checks
from iot_platform.defs.pki.certificates import crl_not_expiring
from iot_platform.defs.resources import ObjectStoreResource, PKIResource, WarehouseResource
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from tests.integration.test_pipeline import _warehouse
from tests.warehouse_data import put_batch, telemetry_messages

pytestmark = pytest.mark.integration

WEBHOOK_TOKEN = "whk-0123456789-secret"
SLACK_TOKEN = "xoxb-0000-1111-test-secret"
HOOK_PATH = "/hooks/path-secret-4711"  # a webhook URL may carry a secret in its path
CLOCK_SKEW = "warehouse/telemetry:clock_skew"


@dataclass
class Receiver:
    """Records every request; answers ``fail_next`` requests with HTTP 500 first."""

    port: int = 0
    requests: list[dict] = field(default_factory=list)
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def webhook_bodies(self) -> list[dict]:
        return [r["json"] for r in self.requests if r["path"] == HOOK_PATH and r["code"] == 200]

    def slack_bodies(self) -> list[dict]:
        return [r["json"] for r in self.requests if r["path"] == "/slack/api/chat.postMessage"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                failing = state.fail_next > 0 and self.path == HOOK_PATH
                state.fail_next -= int(failing)
                code = 500 if failing else 200
                state.requests.append(
                    {
                        "path": self.path,
                        "code": code,
                        "auth": self.headers.get("Authorization"),
                        "raw": body.decode(),
                        "json": json.loads(body) if body else None,
                    }
                )
            answer = json.dumps({"ok": True, "channel": "C1", "ts": "1.0"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _fleet(conn: psycopg.Connection, store, now: dt.datetime) -> None:
    """dev-ok on time; dev-skew's device clock 10 minutes behind its receive time."""
    conn.execute("INSERT INTO devices (device_id) VALUES ('dev-ok'), ('dev-skew')")
    conn.commit()
    good = telemetry_messages(["dev-ok"], now - dt.timedelta(minutes=5), 29)
    skewed = [
        (received + dt.timedelta(minutes=10), topic, payload)
        for received, topic, payload in telemetry_messages(
            ["dev-skew"], now - dt.timedelta(minutes=15), 29
        )
    ]
    info = put_batch(store, good + skewed, seq=1)
    load_object(
        conn,
        store,
        info,
        run_id="alerts",
        parameters=load_parameters(conn),
        devices=known_devices(conn),
        max_payload_bytes=262144,
    )
    conn.commit()


@pytest.fixture
def env(postgres_db, tmp_path, receiver, monkeypatch):
    warehouse = _warehouse(postgres_db)
    store = ObjectStoreResource(backend="local", local_dir=str(tmp_path / "o")).store()
    with warehouse.connect() as conn:
        _fleet(conn, store, dt.datetime.now(dt.UTC))
    monkeypatch.setenv("IOT_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}{HOOK_PATH}")
    monkeypatch.setenv("IOT_ALERT_WEBHOOK_TOKEN", WEBHOOK_TOKEN)
    token_file = tmp_path / "slack_token"
    token_file.write_text(SLACK_TOKEN + "\n")
    monkeypatch.setenv("IOT_ALERT_SLACK_TOKEN_FILE", str(token_file))  # the _FILE form
    monkeypatch.delenv("IOT_ALERT_SLACK_TOKEN", raising=False)
    monkeypatch.setenv("IOT_ALERT_SLACK_API_URL", f"http://127.0.0.1:{receiver.port}/slack/api")
    monkeypatch.setenv("IOT_ALERT_SLACK_CHANNEL", "#ops")
    return warehouse


def _evaluate_checks(warehouse, instance) -> dict[str, bool]:
    """One run of the device-health checks (as device_health_job does), recorded in
    ``instance``; returns check name -> passed."""
    job = dg.define_asset_job("health", selection=dg.AssetSelection.all_asset_checks())
    result = (
        dg.Definitions(
            asset_checks=[device_health_checks], jobs=[job], resources={"warehouse": warehouse}
        )
        .resolve_job_def("health")
        .execute_in_process(instance=instance)
    )
    assert result.success
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


class Sensor:
    """Ticks the real sensor, carrying its cursor from tick to tick as the daemon does."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.cursor: str | None = None
        self.reasons: list[str] = []

    def tick(self) -> None:
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor)
        result = check_alerts_sensor(context)
        assert isinstance(result, dg.SensorResult) and not result.run_requests
        self.cursor = result.cursor
        assert result.skip_reason is not None
        self.reasons.append(result.skip_reason.skip_message or "")


def test_one_message_per_transition_and_one_on_recovery(
    env, receiver, tmp_path, monkeypatch, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        sensor = Sensor(instance)
        sensor.tick()  # nothing evaluated yet
        assert receiver.requests == []

        passed = _evaluate_checks(env, instance)
        assert [name for name, ok in passed.items() if not ok] == ["clock_skew"]
        sensor.tick()
        [hook] = receiver.webhook_bodies()
        assert (hook["event"], hook["check"], hook["status"]) == ("failing", CLOCK_SKEW, "warn")
        assert hook["previous_status"] is None and hook["failing_device_ids"] == ["dev-skew"]
        assert hook["failing_devices"] == 1 and hook["run_id"]
        [slack] = receiver.slack_bodies()
        assert slack["channel"] == "#ops" and "WARN warehouse/telemetry:clock_skew" in slack["text"]
        assert "dev-skew" in slack["text"]

        sensor.tick()  # same evaluation again
        _evaluate_checks(env, instance)  # a new evaluation, same status
        sensor.tick()
        assert len(receiver.requests) == 2, "nothing changed: nothing sent"
        assert sensor.reasons[-1].startswith("no check changed status")

        monkeypatch.setenv("IOT_HEALTH_CLOCK_SKEW_S", "3600")  # the skew is now tolerated
        assert all(_evaluate_checks(env, instance).values())
        sensor.tick()
        hooks = receiver.webhook_bodies()
        assert len(hooks) == 2 and len(receiver.slack_bodies()) == 2
        recovery = hooks[-1]
        assert (recovery["event"], recovery["status"], recovery["previous_status"]) == (
            "recovered",
            "ok",
            "warn",
        )
        assert "RECOVERED warehouse/telemetry:clock_skew" in receiver.slack_bodies()[-1]["text"]
        sensor.tick()
        assert len(receiver.requests) == 4

    # Secrets only in the Authorization header of their own channel.
    for request in receiver.requests:
        for secret in (WEBHOOK_TOKEN, SLACK_TOKEN, HOOK_PATH):
            assert secret not in request["raw"]
    assert {r["auth"] for r in receiver.requests if r["path"] == HOOK_PATH} == {
        f"Bearer {WEBHOOK_TOKEN}"
    }
    assert {r["auth"] for r in receiver.requests if r["path"] != HOOK_PATH} == {
        f"Bearer {SLACK_TOKEN}"
    }
    logged = caplog.text + "".join(capsys.readouterr()) + "".join(sensor.reasons)
    assert "alert sent: warehouse/telemetry:clock_skew via webhook" in logged
    for secret in (WEBHOOK_TOKEN, SLACK_TOKEN, HOOK_PATH):
        assert secret not in logged
    assert sensor.cursor and WEBHOOK_TOKEN not in sensor.cursor


def test_a_failed_delivery_is_retried_on_the_next_tick(env, receiver, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _evaluate_checks(env, instance)
        sensor = Sensor(instance)
        receiver.fail_next = 1
        sensor.tick()
        assert receiver.webhook_bodies() == [] and "not delivered" in sensor.reasons[-1]
        assert "webhook answered HTTP 500" in caplog.text
        sensor.tick()
        [hook] = receiver.webhook_bodies()
        assert hook["check"] == CLOCK_SKEW and hook["event"] == "failing"
        sensor.tick()
        assert len(receiver.webhook_bodies()) == 1
    assert HOOK_PATH not in caplog.text and WEBHOOK_TOKEN not in caplog.text


def test_without_a_channel_the_sensor_tracks_and_says_so(env, tmp_path, monkeypatch, receiver):
    monkeypatch.delenv("IOT_ALERT_WEBHOOK_URL")
    monkeypatch.delenv("IOT_ALERT_SLACK_TOKEN_FILE")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        _evaluate_checks(env, instance)
        sensor = Sensor(instance)
        sensor.tick()
        assert "no channel configured" in sensor.reasons[-1] and CLOCK_SKEW in sensor.reasons[-1]
        sensor.tick()
        assert sensor.reasons[-1].startswith("no check changed status")
    assert receiver.requests == []


def test_the_crl_check_alerts_as_error_and_recovers(ca, tmp_path, receiver, monkeypatch):
    """The PKI side: an expiring CRL is an ERROR message, a re-signed one a recovery."""
    monkeypatch.setenv("IOT_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}{HOOK_PATH}")
    monkeypatch.delenv("IOT_ALERT_SLACK_TOKEN", raising=False)
    monkeypatch.delenv("IOT_ALERT_SLACK_TOKEN_FILE", raising=False)

    def evaluate_crl(instance: dg.DagsterInstance, margin_hours: float) -> None:
        # reading the CRL needs no CA key: any non-empty passphrase will do
        pki = PKIResource(
            certs_dir=str(ca.certs_dir),
            ca_passphrase="unused-to-read-the-crl",
            crl_min_remaining_hours=margin_hours,
        )
        job = dg.define_asset_job("crl", selection=dg.AssetSelection.all_asset_checks())
        result = (
            dg.Definitions(asset_checks=[crl_not_expiring], jobs=[job], resources={"pki": pki})
            .resolve_job_def("crl")
            .execute_in_process(instance=instance)
        )
        assert result.success

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        sensor = Sensor(instance)
        evaluate_crl(instance, margin_hours=24 * 30)  # the CRL's 7 days are "too close"
        sensor.tick()
        evaluate_crl(instance, margin_hours=1)
        sensor.tick()
        sensor.tick()
    failing, recovered = receiver.webhook_bodies()
    assert (failing["check"], failing["status"], failing["event"]) == (
        "pki/crl:crl_not_expiring",
        "error",
        "failing",
    )
    assert failing["metadata"]["min_remaining_hours"] == 24 * 30
    assert (recovered["status"], recovered["event"]) == ("ok", "recovered")


def test_a_health_run_that_fails_is_an_error_until_the_checks_run_again(
    env, receiver, tmp_path, monkeypatch
):
    """The warehouse unreachable: every device check's run fails before evaluating it."""
    monkeypatch.delenv("IOT_ALERT_SLACK_TOKEN_FILE")
    unreachable = WarehouseResource(
        host="127.0.0.1", port=1, user=env.user, password=env.password, dbname=env.dbname
    )
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        sensor = Sensor(instance)
        _evaluate_checks(env, instance)
        sensor.tick()  # clock_skew WARN
        job = dg.define_asset_job("health", selection=dg.AssetSelection.all_asset_checks())
        failed = (
            dg.Definitions(
                asset_checks=[device_health_checks],
                jobs=[job],
                resources={"warehouse": unreachable},
            )
            .resolve_job_def("health")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        assert not failed.success
        sensor.tick()
        sensor.tick()
        _evaluate_checks(env, instance)
        sensor.tick()
    first, *down = receiver.webhook_bodies()
    checks = set(device_health_checks.check_keys)
    errors, back = down[: len(checks)], down[len(checks) :]
    assert first["check"] == CLOCK_SKEW
    assert {m["status"] for m in errors} == {"error"}
    assert {m["metadata"]["run_status"] for m in errors} == {"FAILURE"}
    assert {m["check_name"] for m in errors} == {k.name for k in checks}
    assert "did not complete" in errors[0]["summary"]
    # the checks ran again: clock_skew back to WARN, every other one recovered
    assert {(m["check_name"], m["event"], m["status"]) for m in back} == {
        (k.name, "recovered", "ok") for k in checks if k.name != "clock_skew"
    } | {("clock_skew", "severity_changed", "warn")}
