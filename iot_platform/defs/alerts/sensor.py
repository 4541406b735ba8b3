"""The alert sensor: a notification when a health or PKI check starts failing or recovers.

Each tick reads the latest evaluation of every watched check from the instance's event log
(``EventLogStorage.get_latest_asset_check_execution_by_key``) — a check whose run failed
before evaluating it counts as ERROR, so a health job that cannot reach the warehouse is
heard about too — compares each check's status with the one remembered in the sensor
cursor, and sends one message per change (``iot_platform.alerts``). Evaluations that change
nothing send nothing, however often the checks run. On by default and visible under
Automation in the UI, where an operator can stop it. It launches no runs: its tick says
what it sent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from iot_platform.alerts import (
    Channel,
    Evaluation,
    SlackChannel,
    Status,
    WebhookChannel,
    deliver,
    next_state,
    transitions,
)
from iot_platform.defs.health import checks as health_checks
from iot_platform.defs.pki import certificates as pki_checks
from iot_platform.settings import AlertSettings, env_secret

# Every check of the platform location that an operator must hear about.
WATCHED: tuple[dg.AssetCheckKey, ...] = tuple(
    sorted(
        {
            *health_checks.device_health_checks.check_keys,
            *pki_checks.crl_not_expiring.check_keys,
            *pki_checks.certificates_expiring_soon.check_keys,
            *pki_checks.devices_without_valid_certificate.check_keys,
        },
        key=lambda key: (key.asset_key.to_user_string(), key.name),
    )
)
CURSOR_VERSION = 1


def check_name(key: dg.AssetCheckKey) -> str:
    return f"{key.asset_key.to_user_string()}:{key.name}"


def _json_metadata(metadata: dg.RawMetadataMapping) -> dict[str, Any]:
    """The evaluation's metadata as plain JSON values (what a receiver can use)."""
    plain: dict[str, Any] = {}
    for name, value in metadata.items():
        raw = value.value if isinstance(value, dg.MetadataValue) else value
        try:
            json.dumps(raw)
        except (TypeError, ValueError):
            raw = str(raw)
        plain[name] = raw
    return plain


# A check planned in a run that ended like this will not complete: it is an ERROR (the
# platform could not evaluate it: warehouse down, a bug), not "no news".
RUN_ENDED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _not_completed(
    run_status: dg.DagsterRunStatus | None, key: dg.AssetCheckKey, run_id: str, at: float
) -> Evaluation | None:
    """An ERROR evaluation for a check whose run ended without evaluating it; None while
    the run is still going."""
    if run_status not in RUN_ENDED:
        return None
    assert run_status is not None  # RUN_ENDED holds statuses only
    status = run_status.value
    return Evaluation(
        check=check_name(key),
        status=Status.ERROR,
        evaluated_at=datetime.fromtimestamp(at, UTC),
        run_id=run_id,
        description=f"the check did not complete: its run ended {status}",
        metadata={"run_status": status},
    )


def latest_evaluations(instance: dg.DagsterInstance) -> list[Evaluation]:
    """The newest evaluation of each watched check: its result, or an ERROR when its run
    ended without evaluating it. Checks still running, and checks never evaluated, are
    left out: they have no status yet."""
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(WATCHED))
    unevaluated = {
        record.run_id
        for record in records.values()
        if record.event is None or record.event.asset_check_evaluation is None
    }
    # One run lookup per tick for all checks left without an evaluation (they share runs).
    run_status = {
        run.dagster_run.run_id: run.dagster_run.status
        for run in (
            instance.get_run_records(dg.RunsFilter(run_ids=sorted(unevaluated)))
            if unevaluated
            else ()
        )
    }
    found = []
    for key in WATCHED:
        record = records.get(key)
        if record is None:
            continue
        entry = record.event
        evaluation = entry.asset_check_evaluation if entry else None
        if entry is None or evaluation is None:
            failed = _not_completed(
                run_status.get(record.run_id), key, record.run_id, record.create_timestamp
            )
            if failed is not None:
                found.append(failed)
            continue
        if evaluation.passed:
            status = Status.OK
        elif evaluation.severity == dg.AssetCheckSeverity.ERROR:
            status = Status.ERROR
        else:
            status = Status.WARN
        found.append(
            Evaluation(
                check=check_name(key),
                status=status,
                evaluated_at=datetime.fromtimestamp(entry.timestamp, UTC),
                run_id=record.run_id,
                description=evaluation.description or "",
                metadata=_json_metadata(evaluation.metadata),
            )
        )
    return found


def configured_channels(settings: AlertSettings) -> list[Channel]:
    """The webhook when its URL is set; Slack (dagster-slack's client) when its token is.

    Tokens are read here, per tick, from ``IOT_ALERT_*_TOKEN`` or ``..._FILE``: never
    resource or run config, so the UI never shows them."""
    channels: list[Channel] = []
    if settings.webhook_url:
        channels.append(
            WebhookChannel(
                settings.webhook_url, env_secret("IOT_ALERT_WEBHOOK_TOKEN"), settings.timeout_s
            )
        )
    slack_token = env_secret("IOT_ALERT_SLACK_TOKEN")
    if slack_token is not None:
        from dagster_slack import SlackResource  # slack_sdk only when Slack is configured

        client = SlackResource(token=slack_token.value).get_client()
        client.base_url = settings.slack_api_url
        client.timeout = int(settings.timeout_s)
        channels.append(SlackChannel(client, settings.slack_channel))
    return channels


def _known(cursor: str | None) -> dict[str, str]:
    """The statuses last notified, for the checks still watched (a removed check is
    forgotten; a cursor of another version starts afresh)."""
    if not cursor:
        return {}
    state = json.loads(cursor)
    if state.get("version") != CURSOR_VERSION:
        return {}
    watched = {check_name(key) for key in WATCHED}
    return {name: status for name, status in state["checks"].items() if name in watched}


@dg.sensor(
    name="check_alerts_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Notifies (JSON webhook IOT_ALERT_WEBHOOK_URL, Slack when IOT_ALERT_SLACK_TOKEN "
    "is set) once when a device-health or PKI check starts failing, changes severity or "
    "recovers; nothing while nothing changes. Stop it here to silence notifications.",
)
def check_alerts_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    settings = AlertSettings.from_env()
    known = _known(context.cursor)
    evaluations = latest_evaluations(context.instance)
    found = transitions(known, evaluations)
    # Tokens are read and clients built only when there is something to send.
    channels = configured_channels(settings) if found else []
    delivery = deliver(channels, found)
    for where in delivery.sent:
        context.log.info(f"alert sent: {where}")
    for failure in delivery.failed:
        context.log.error(f"alert not delivered (retried next tick): {failure}")
    cursor = json.dumps(
        {"version": CURSOR_VERSION, "checks": next_state(known, evaluations, delivery.undelivered)},
        sort_keys=True,
    )
    changes = ", ".join(f"{t.current.check} -> {t.current.status.value}" for t in found)
    if not found:
        reason = f"no check changed status ({len(evaluations)}/{len(WATCHED)} checks evaluated)"
    elif not channels:
        reason = (
            f"{len(found)} change(s), no channel configured (set IOT_ALERT_WEBHOOK_URL or "
            f"IOT_ALERT_SLACK_TOKEN): {changes}"
        )
    elif delivery.failed:
        reason = f"{len(delivery.failed)} message(s) not delivered, retried next tick: {changes}"
    else:
        reason = f"sent {len(delivery.sent)} message(s): {changes}"
    return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=cursor)
