"""One definition of the topic families gives the ACL, the ingest subscriptions and the
decoder's routing: a device may publish exactly what the platform consumes."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from ingest_daemon.config import DEFAULT_TOPICS
from iot_platform.broker_control import render_acl
from iot_platform.decode import decode_raw
from iot_platform.rawbatch import RAW_SCHEMA
from iot_platform.topics import FAMILIES

DEVICE = "dev-1"
# What a device might try: the families with its own id, and the odd topics of issue 11.
CANDIDATES = [
    *(
        "/".join((f.root, DEVICE, *(("x",) * len(f.tail) if "+" in f.tail else f.tail)))
        for f in FAMILIES
    ),
    f"iot/{DEVICE}/telemetry/extra",
    f"iot/{DEVICE}/Telemetry",
    f"iot/{DEVICE}/command",
    f"iot/{DEVICE}/command/ack/x",
    f"iot/{DEVICE}/ota",
    f"devices/{DEVICE}/temp/extra",
    f"devices/{DEVICE}",
    f"tele/{DEVICE}/m/c",
    f"tele/{DEVICE}/m/c/x/y",
    f"stat/{DEVICE}/m/c/x/y",
    f"cmnd/{DEVICE}/m/c/x",
    "iot/other/telemetry",
    "devices/other/temp",
    "iot/telemetry",
]


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    parts, levels = topic_filter.split("/"), topic.split("/")
    for n, part in enumerate(parts):
        if part == "#":
            return True
        if n >= len(levels) or (part != "+" and part != levels[n]):
            return False
    return len(parts) == len(levels)


def _device_writes() -> list[str]:
    """The write patterns a device gets, read back from the rendered ACL."""
    writes = []
    for line in render_acl("ingest", []).splitlines():
        words = line.split()
        if words[:2] == ["pattern", "write"]:
            writes.append(words[2].replace("%u", DEVICE))
        assert words[:2] != ["topic", "write"], line  # no write rule outside the patterns
    return writes


def _routed(topics: list[str]) -> dict[str, str | None]:
    """topic -> the decoder's reject reason for an empty-ish payload (None: routed fine)."""
    at = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    out = decode_raw(
        pa.table(
            {
                "received_at": pa.array([at] * len(topics), pa.timestamp("us", tz="UTC")),
                "topic": pa.array(topics, pa.string()).dictionary_encode(),
                "payload": pa.array([b"1"] * len(topics), pa.binary()),
                "qos": pa.array([1] * len(topics), pa.int8()),
                "retain": pa.array([False] * len(topics), pa.bool_()),
            },
            schema=RAW_SCHEMA,
        )
    )
    reasons = dict(zip(out.rejects["topic"], out.rejects["reason"], strict=True))
    return {t: reasons.get(t) for t in topics}


def test_the_acl_lets_a_device_publish_exactly_what_ingest_subscribes_to():
    writes = _device_writes()
    for topic in CANDIDATES:
        allowed = any(_matches(w, topic) for w in writes)
        consumed = any(_matches(s, topic) for s in DEFAULT_TOPICS) and topic.split("/")[1] == (
            DEVICE
        )
        published_by_devices = not topic.startswith("cmnd/")  # commands go to devices
        assert allowed == (consumed and published_by_devices), topic


@pytest.mark.parametrize(
    "topic",
    [
        f"iot/{DEVICE}/telemetry/extra",
        f"iot/{DEVICE}/Telemetry",
        f"iot/{DEVICE}/command",
        f"devices/{DEVICE}/temp/extra",
    ],
)
def test_topics_nobody_consumes_are_refused_by_the_acl(topic):
    assert not any(_matches(w, topic) for w in _device_writes())
    assert not any(_matches(s, topic) for s in DEFAULT_TOPICS)


def test_every_subscribed_topic_is_routed_to_a_decoder_family():
    subscribed = [t for t in CANDIDATES if any(_matches(s, t) for s in DEFAULT_TOPICS)]
    assert len(subscribed) >= len(FAMILIES)
    routed = _routed(subscribed)
    assert "unknown_family" not in routed.values(), routed
    unsubscribed = [t for t in CANDIDATES if t not in subscribed]
    assert set(_routed(unsubscribed).values()) == {"unknown_family"}
