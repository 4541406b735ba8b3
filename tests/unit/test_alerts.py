"""Transition logic of iot_platform.alerts (pure): what is news and what is remembered."""

from __future__ import annotations

import datetime as dt

from iot_platform.alerts import Evaluation, Status, Transition, next_state, payload, transitions

AT = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def ev(check: str, status: Status, **metadata: object) -> Evaluation:
    return Evaluation(check, status, AT, "run-1", metadata=metadata)


def test_first_sight_is_news_only_when_failing():
    found = transitions({}, [ev("a:ok", Status.OK), ev("a:bad", Status.ERROR)])
    assert [(t.current.check, t.previous, t.kind) for t in found] == [("a:bad", None, "failing")]


def test_unchanged_is_silent_and_every_change_is_one_transition():
    known = {"a:x": "warn", "a:y": "warn", "a:z": "error", "a:w": "ok"}
    found = transitions(
        known,
        [
            ev("a:x", Status.WARN),
            ev("a:y", Status.ERROR),
            ev("a:z", Status.OK),
            ev("a:w", Status.WARN),
        ],
    )
    assert [(t.current.check, t.kind) for t in found] == [
        ("a:y", "severity_changed"),
        ("a:z", "recovered"),
        ("a:w", "failing"),
    ]


def test_undelivered_checks_keep_their_old_status_for_a_retry():
    evaluations = [ev("a:x", Status.ERROR), ev("a:y", Status.WARN)]
    state = next_state({"a:x": "ok", "old:z": "warn"}, evaluations, undelivered={"a:x"})
    assert state == {"a:x": "ok", "a:y": "warn", "old:z": "warn"}
    assert [t.current.check for t in transitions(state, evaluations)] == ["a:x"]


def test_payload_quotes_at_most_twenty_failing_devices():
    ids = [f"dev-{n:02d}" for n in range(30)]
    body = payload(
        Transition(
            None,
            ev(
                "warehouse/telemetry:clock_skew",
                Status.WARN,
                failing_devices=30,
                failing_device_ids=ids,
            ),
        )
    )
    assert body["asset"] == "warehouse/telemetry" and body["check_name"] == "clock_skew"
    assert body["failing_device_ids"] == ids[:20] and body["failing_devices"] == 30
    assert body["summary"].startswith("WARN warehouse/telemetry:clock_skew: 30 device(s) failing")
    assert "(+25 more)" in body["summary"]
