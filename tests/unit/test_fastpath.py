"""The ingest daemon's fast PUBLISH reader on synthetic MQTT bytes, against the installed
paho-mqtt: framing, split packets, remaining lengths of 1-4 bytes, v5 properties, QoS 0/1/2,
other packets between publishes in order, batched PUBACKs, and the version fence."""

from __future__ import annotations

import struct
from collections import deque
from types import SimpleNamespace

import paho.mqtt
import paho.mqtt.client as mqtt
import pytest

from ingest_daemon import fastpath
from ingest_daemon.fastpath import VERIFIED_PAHO, PublishReader, paho_version

PINGRESP = b"\xd0\x00"


def varint(n: int) -> bytes:
    """MQTT variable byte integer (remaining length, property length)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    mid: int = 0,
    retain: bool = False,
    props: bytes = b"",
    v5: bool = True,
) -> bytes:
    name = topic.encode()
    body = struct.pack(">H", len(name)) + name
    if qos:
        body += struct.pack(">H", mid)
    if v5:
        body += varint(len(props)) + props
    body += payload
    return bytes([0x30 | qos << 1 | int(retain)]) + varint(len(body)) + body


def suback(mid: int, *, v5: bool = True) -> bytes:
    body = struct.pack(">H", mid) + (b"\x00" if v5 else b"") + b"\x01"
    return b"\x90" + varint(len(body)) + body


class FakeSocket:
    """What paho reads from and writes to: queued chunks, then 'nothing more for now'."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.sent = bytearray()

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.popleft()
        if len(chunk) > size:
            self.chunks.appendleft(chunk[size:])
            chunk = chunk[:size]
        return chunk

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def close(self) -> None:
        self.chunks.clear()


class Harness:
    """A real paho client (never connected) with the reader installed on a fake socket.
    ``events`` records, in order, the sink's runs and what paho's own handlers saw."""

    def __init__(self, *, v5: bool = True) -> None:
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol, manual_ack=True
        )
        self.sock = FakeSocket()
        self.client._sock = self.sock
        self.events: list[tuple] = []
        self.client.on_message = lambda _c, _u, m: self.events.append(
            ("paho", m.topic, m.payload, m.qos, m.mid)
        )
        self.client.on_subscribe = lambda _c, _u, mid, _rc, _p: self.events.append(("suback", mid))
        reader = PublishReader.install(self.client, self._sink)
        assert reader is not None
        self.reader = reader

    def _sink(self, topics, payloads, qos, retain, mids) -> None:
        self.events.append(("run", list(zip(topics, payloads, qos, retain, mids, strict=True))))

    def feed(self, *chunks: bytes) -> None:
        """Deliver ``chunks`` and let the client read until the socket has nothing more."""
        self.sock.chunks.extend(chunks)
        while self.sock.chunks:
            rc = self.client._packet_read()
            assert rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN), rc  # AGAIN: drained

    def published(self) -> list[tuple]:
        """Every publish seen, in order, whichever path took it: (topic, payload, qos, mid)."""
        out = []
        for event in self.events:
            if event[0] == "run":
                out += [(t, p, q, m) for t, p, q, _r, m in event[1]]
            elif event[0] == "paho":
                out.append(event[1:])
        return out


def test_the_installed_paho_is_the_verified_one():
    assert paho_version() in VERIFIED_PAHO, paho.mqtt.__version__


def test_a_run_of_publishes_reaches_the_sink_as_columns_in_one_call():
    h = Harness()
    h.feed(
        publish("iot/a/telemetry", b"one", qos=1, mid=1)
        + publish("iot/a/hello", b"two", qos=0)
        + publish("iot/a/status", b"three", qos=1, mid=65535, retain=True)
    )
    assert h.events == [
        (
            "run",
            [
                ("iot/a/telemetry", b"one", 1, False, 1),
                ("iot/a/hello", b"two", 0, False, 0),  # QoS 0: nothing to acknowledge
                ("iot/a/status", b"three", 1, True, 65535),
            ],
        )
    ]


def test_a_stream_split_at_every_byte_gives_the_same_messages():
    stream = (
        publish("iot/a/telemetry", b"x" * 200, qos=1, mid=7)  # 2-byte remaining length
        + suback(3)
        + publish("devices/a/t", b"21.5", qos=1, mid=8, props=b"\x02\x00\x00\x00\x3c")
    )
    expected = [("iot/a/telemetry", b"x" * 200, 1, 7), ("devices/a/t", b"21.5", 1, 8)]
    for split in range(1, len(stream)):
        h = Harness()
        h.feed(stream[:split])
        h.feed(stream[split:])
        assert h.published() == expected, split
        assert ("suback", 3) in h.events, split


@pytest.mark.parametrize(
    "size",
    [0, 1, 100, 127 - 20, 128, 16_383, 16_384, 300_000, 2_097_152],  # lengths of 1-4 bytes
)
def test_remaining_lengths_of_one_to_four_bytes(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = publish("iot/dev-1/telemetry", payload, qos=1, mid=42)
    h = Harness()
    h.feed(*(packet[i : i + 50_000] for i in range(0, len(packet), 50_000)))
    assert h.published() == [("iot/dev-1/telemetry", payload, 1, 42)]


def test_v5_properties_are_skipped_and_long_ones_are_left_to_paho_in_order():
    user_property = b"\x26" + struct.pack(">H", 3) + b"key" + struct.pack(">H", 200) + b"v" * 200
    h = Harness()
    h.feed(
        publish("iot/a/telemetry", b"short-props", qos=1, mid=1, props=b"\x01\x01")
        + publish("iot/a/telemetry", b"long-props", qos=1, mid=2, props=user_property)
        + publish("iot/a/telemetry", b"after", qos=1, mid=3)
    )
    assert [e[0] for e in h.events] == ["run", "paho", "run"]
    assert h.published() == [
        ("iot/a/telemetry", b"short-props", 1, 1),
        ("iot/a/telemetry", b"long-props", 1, 2),
        ("iot/a/telemetry", b"after", 1, 3),
    ]


def test_qos_2_goes_through_paho_between_the_runs():
    h = Harness()
    h.feed(
        publish("iot/a/telemetry", b"q0")
        + publish("iot/a/telemetry", b"q2", qos=2, mid=9)
        + publish("iot/a/telemetry", b"q1", qos=1, mid=10)
    )
    # QoS 2 splits the run: paho takes it (PUBREC now, the message on PUBREL)
    assert h.events == [
        ("run", [("iot/a/telemetry", b"q0", 0, False, 0)]),
        ("run", [("iot/a/telemetry", b"q1", 1, False, 10)]),
    ]
    assert h.sock.sent[:1] == b"\x50" and b"\x00\x09" in h.sock.sent  # PUBREC, mid 9
    h.feed(b"\x62\x02\x00\x09")  # PUBREL
    assert h.events[-1] == ("paho", "iot/a/telemetry", b"q2", 2, 9)


def test_other_packets_between_publishes_are_handled_in_arrival_order():
    h = Harness()
    h.feed(
        publish("iot/a/telemetry", b"1", qos=1, mid=1)
        + suback(77)
        + PINGRESP
        + publish("iot/a/telemetry", b"2", qos=1, mid=2)
        + suback(78)
    )
    assert h.events == [
        ("run", [("iot/a/telemetry", b"1", 1, False, 1)]),
        ("suback", 77),
        ("run", [("iot/a/telemetry", b"2", 1, False, 2)]),
        ("suback", 78),
    ]


def test_a_v311_session_has_no_properties_to_skip():
    h = Harness(v5=False)
    h.feed(
        publish("iot/a/telemetry", b"\x01\x02", qos=1, mid=5, v5=False)
        + suback(6, v5=False)
        + publish("iot/a/telemetry", b"end", v5=False)
    )
    assert h.published() == [
        ("iot/a/telemetry", b"\x01\x02", 1, 5),
        ("iot/a/telemetry", b"end", 0, 0),
    ]
    assert ("suback", 6) in h.events


def test_pubacks_for_a_batch_go_out_as_one_write():
    h = Harness()
    h.reader.send_pubacks([1, 2, 65535])
    assert bytes(h.sock.sent) == b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02" + b"\x40\x02\xff\xff"


def test_an_unverified_paho_keeps_the_stock_read_path(monkeypatch, caplog):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    stock = client._packet_read
    monkeypatch.setattr(paho.mqtt, "__version__", "2.3.0")
    assert PublishReader.install(client, lambda *_: None) is None
    assert client._packet_read == stock
    assert "outside the verified" in caplog.text


def test_missing_paho_internals_keep_the_stock_read_path(caplog):
    stand_in = SimpleNamespace(_protocol=mqtt.MQTTv5)  # a client without the private members
    assert PublishReader.install(stand_in, lambda *_: None) is None
    assert "internals changed" in caplog.text
    assert fastpath.VERIFIED_PAHO  # the fence is declared
