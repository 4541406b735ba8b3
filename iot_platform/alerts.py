"""Notifications about the platform's own checks: what changed, what to send, sending it.

Dagster-free on purpose: the alert sensor (``iot_platform.defs.alerts``) turns asset-check
evaluations into ``Evaluation`` values and keeps the last status of each check in its
cursor; this module decides which evaluations are *transitions* (a check that starts
failing, changes severity, or recovers) and delivers one message per transition. A check
that keeps failing on every evaluation is not news, so it is never sent twice.

Channels: a generic JSON webhook (any receiver: Alertmanager-style bridges, chat tools,
an incident system) and Slack through a ``slack_sdk`` client (the sensor gets it from
``dagster-slack``). Secrets (the webhook's bearer token, the Slack token) travel only in
request headers; they are never part of a payload, a log line or an error message, and
neither is the webhook URL (it may carry a secret in its path).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from iot_platform.settings import Secret

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
MAX_DEVICE_IDS = 20  # failing device ids quoted in one message (the check's metadata has more)


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Evaluation:
    """The latest completed evaluation of one check."""

    check: str  # "<asset key>:<check name>", e.g. "warehouse/telemetry:clock_skew"
    status: Status
    evaluated_at: datetime
    run_id: str
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)  # JSON values only


@dataclass(frozen=True)
class Transition:
    previous: Status | None  # None: the first evaluation this sensor has seen
    current: Evaluation

    @property
    def kind(self) -> str:
        if self.current.status is Status.OK:
            return "recovered"
        return "failing" if self.previous in (None, Status.OK) else "severity_changed"


def transitions(known: Mapping[str, str], evaluations: Iterable[Evaluation]) -> list[Transition]:
    """The evaluations whose status differs from the one last notified (``known``).

    A check seen for the first time is news only when it fails: a platform that starts
    healthy sends nothing."""
    found = []
    for evaluation in evaluations:
        previous = Status(known[evaluation.check]) if evaluation.check in known else None
        if previous is evaluation.status or (previous is None and evaluation.status is Status.OK):
            continue
        found.append(Transition(previous, evaluation))
    return found


def next_state(
    known: Mapping[str, str], evaluations: Iterable[Evaluation], undelivered: Iterable[str]
) -> dict[str, str]:
    """The statuses to remember: every evaluation's, except checks whose message could not
    be delivered, which keep their old status so the next tick tries again."""
    retry = set(undelivered)
    state = dict(known)
    for evaluation in evaluations:
        if evaluation.check not in retry:
            state[evaluation.check] = evaluation.status.value
    return state


def payload(transition: Transition) -> dict[str, Any]:
    """The webhook body: stable field names (``version``) a receiver can route on."""
    current = transition.current
    asset, _, check_name = current.check.rpartition(":")
    ids = current.metadata.get("failing_device_ids")
    return {
        "version": PAYLOAD_VERSION,
        "source": "iot-platform",
        "event": transition.kind,
        "check": current.check,
        "asset": asset,
        "check_name": check_name,
        "status": current.status.value,
        "previous_status": transition.previous.value if transition.previous else None,
        "evaluated_at": current.evaluated_at.astimezone(UTC).isoformat(),
        "run_id": current.run_id,
        "summary": summary(transition),
        "description": current.description,
        "failing_devices": current.metadata.get("failing_devices"),
        "failing_device_ids": list(ids[:MAX_DEVICE_IDS]) if isinstance(ids, list) else None,
        "metadata": dict(current.metadata),
    }


def summary(transition: Transition) -> str:
    """One line a person reads first (the Slack message's text, the payload's summary)."""
    current = transition.current
    if transition.kind == "recovered":
        was = transition.previous.value.upper() if transition.previous else "failing"
        return f"RECOVERED {current.check} (was {was})"
    line = f"{current.status.value.upper()} {current.check}"
    count = current.metadata.get("failing_devices")
    ids = current.metadata.get("failing_device_ids")
    if isinstance(count, int) and count:
        quoted = ", ".join(map(str, ids[:5])) if isinstance(ids, list) else ""
        more = f" (+{count - 5} more)" if count > 5 else ""
        line += f": {count} device(s) failing" + (f" - {quoted}{more}" if quoted else "")
    elif "run_status" in current.metadata:
        line += f": {current.description}"
    elif transition.kind == "severity_changed" and transition.previous:
        line += f" (was {transition.previous.value.upper()})"
    return line


class DeliveryError(RuntimeError):
    """A channel refused or did not answer; the message says which, never with a secret."""


class Channel(Protocol):
    @property
    def name(self) -> str: ...

    def send(self, transition: Transition) -> None: ...


@dataclass(frozen=True)
class WebhookChannel:
    """POST the JSON payload; a bearer token, when configured, only in the header."""

    url: str
    token: Secret | None
    timeout_s: float
    name: str = "webhook"

    def send(self, transition: Transition) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "iot-platform-alerts"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token.value}"
        # urllib, not requests: urllib3 logs each request's path at DEBUG, and a webhook
        # URL (Slack's, most chat tools') is a secret (tests/integration/test_alerts.py).
        request = urllib.request.Request(  # noqa: S310 - scheme checked in AlertSettings
            self.url, data=json.dumps(payload(transition)).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:  # noqa: S310
                answer.read()
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"webhook answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise DeliveryError(f"webhook unreachable: {type(reason).__name__}") from None


class SlackClient(Protocol):
    """The part of ``slack_sdk.WebClient`` used here."""

    def chat_postMessage(self, *, channel: str, text: str) -> Any: ...


@dataclass(frozen=True)
class SlackChannel:
    client: SlackClient
    channel: str
    name: str = "slack"

    def send(self, transition: Transition) -> None:
        # Imported here: slack_sdk comes with dagster-slack; the webhook path needs neither.
        from slack_sdk.errors import SlackApiError, SlackClientError

        text = summary(transition)
        run = transition.current.run_id
        if run:
            text += f" (run {run})"
        try:
            self.client.chat_postMessage(channel=self.channel, text=text)
        except SlackApiError as exc:
            raise DeliveryError(f"slack refused: {exc.response.get('error', 'error')}") from None
        except (SlackClientError, OSError) as exc:
            raise DeliveryError(f"slack unreachable: {type(exc).__name__}") from None


@dataclass(frozen=True)
class Delivery:
    sent: list[str]  # "<check> via <channel>"
    failed: list[str]  # "<check> via <channel>: <reason>"
    undelivered: set[str]  # checks to retry next tick


def deliver(channels: Iterable[Channel], found: Iterable[Transition]) -> Delivery:
    """Send every transition on every channel; a check whose message failed on any channel
    is retried on the next tick (at-least-once: a channel that succeeded may see it again)."""
    delivery = Delivery(sent=[], failed=[], undelivered=set())
    channels = list(channels)
    for transition in found:
        for channel in channels:
            where = f"{transition.current.check} via {channel.name}"
            try:
                channel.send(transition)
            except DeliveryError as exc:
                delivery.failed.append(f"{where}: {exc}")
                delivery.undelivered.add(transition.current.check)
                log.warning("alert not delivered: %s: %s", where, exc)
            else:
                delivery.sent.append(where)
    return delivery
