"""The ingest daemon's fast read path: paho's socket reads with the per-message work
taken out, fenced to the paho-mqtt releases it was verified against.

It replaces paho's private ``Client._packet_read`` and uses other private members, so a
paho release could change them under it. Hence: pyproject pins paho-mqtt to
``VERIFIED_PAHO`` (the range the unit tests in ``tests/unit/test_fastpath.py`` and the
ingest integration tests ran on), and ``PublishReader.install`` refuses (returns None,
leaving paho's stock path, with a warning) on any other paho version or when a member it
needs is missing. Whether it is active is visible: ``/healthz`` ``fast_path`` and the
``ingest_fast_path`` gauge.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

log = logging.getLogger("ingest_daemon")

# paho-mqtt (major, minor) releases this reader was verified against (pyproject pins them).
VERIFIED_PAHO = ((2, 2),)

_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_WORD = 0x4002_0000  # PUBACK, remaining length 2; OR the packet id into the low half
_RECV_SIZE = 64 * 1024  # a TLS read returns at most one 16 KiB record anyway
_READ_BUDGET = 1024 * 1024  # per call, so writes (acks) and keepalive get their turn
_TOPIC_CACHE_MAX = 50_000

# (topics, payloads, qos, retain, packet ids) of consecutive PUBLISH packets
PublishSink = Callable[[list[str], list[bytes], list[int], list[bool], list[int]], None]


class PublishReader:
    """paho's read path with the per-message work taken out of it.

    Stock paho reads a packet with three or more socket calls, runs select() between
    packets and builds an MQTTMessage, a v5 ``Properties`` and a callback dispatch per
    message: at ~200-byte messages that was three quarters of the daemon's CPU
    (py-spy, ``bench/ingest.py --profile``). This reader takes whatever the socket has
    (up to ``_READ_BUDGET`` bytes), frames the packets itself and hands each run of
    QoS 0/1 PUBLISH packets to ``sink`` as columns, in one call. Everything else —
    CONNACK, SUBACK, PINGRESP, DISCONNECT, QoS 2, an empty (aliased) or non-UTF-8 topic —
    goes to paho's own handler in arrival order, so the callbacks see what they always
    saw. Acknowledgements go out as one write per batch
    (``send_pubacks``) instead of one TLS record per message.

    It uses paho 2.x internals (``_packet_read``, ``_in_packet``, ``_packet_handle``,
    ``_sock``, ``_sock_recv``, ``_packet_queue``); ``install`` returns None, leaving the
    stock path in place, on a paho release outside ``VERIFIED_PAHO`` or if they are missing.
    """

    _INTERNALS = (
        "_packet_read",
        "_packet_handle",
        "_packet_queue",
        "_sock_recv",
        "_in_packet",
        "_sock",
        "_msgtime_mutex",
        "_protocol",
    )

    def __init__(self, client: mqtt.Client, sink: PublishSink) -> None:
        self._client = client
        self._sink = sink
        self._v5 = client._protocol == mqtt.MQTTv5
        self._sock: object = None
        self._partial = b""
        self._topics: dict[bytes, str] = {}

    @classmethod
    def install(cls, client: mqtt.Client, sink: PublishSink) -> PublishReader | None:
        """Take over ``client``'s reads; None (stock paho path kept) when not verified."""
        version = paho_version()
        if version not in VERIFIED_PAHO:
            log.warning(
                "paho-mqtt %s is outside the verified %s: using its slower per-message read path",
                paho.mqtt.__version__,
                ", ".join(f"{major}.{minor}.x" for major, minor in VERIFIED_PAHO),
            )
            return None
        if not all(hasattr(client, name) for name in cls._INTERNALS):
            log.warning("paho-mqtt internals changed: using its slower per-message read path")
            return None
        reader = cls(client, sink)
        client._packet_read = reader.packet_read  # type: ignore[method-assign]
        return reader

    # ---- acks -------------------------------------------------------------------
    def send_pubacks(self, mids: list[int]) -> None:
        """Queue the PUBACKs of many QoS 1 messages as one write."""
        for start in range(0, len(mids), 16384):
            chunk = mids[start : start + 16384]
            data = struct.pack(f">{len(chunk)}I", *[_PUBACK_WORD | mid for mid in chunk])
            self._client._packet_queue(_PUBACK, data, 0, 0)

    # ---- reading ----------------------------------------------------------------
    def packet_read(self) -> MQTTErrorCode:
        """Stands in for ``Client._packet_read``: read what is there, handle every packet."""
        client = self._client
        if client._sock is not self._sock:  # a new connection: forget the old one's bytes
            self._sock = client._sock
            self._partial = b""
        chunks = [self._partial]
        received = 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while received < _READ_BUDGET:
            try:
                chunk = client._sock_recv(_RECV_SIZE)
            except BlockingIOError:
                rc = MQTTErrorCode.MQTT_ERR_AGAIN
                break
            except OSError as err:
                client._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                break
            if not chunk:
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                break
            chunks.append(chunk)
            received += len(chunk)
        if received:
            with client._msgtime_mutex:
                client._last_bytes_received = time.monotonic()
            data = b"".join(chunks)
            consumed, handled = self._handle(data)
            self._partial = data[consumed:]
            if handled > 0:
                return handled
        return rc

    def _handle(self, data: bytes) -> tuple[int, MQTTErrorCode]:
        """Handle every complete packet in ``data``; returns (bytes consumed, rc)."""
        end = len(data)
        pos = 0
        topics: list[str] = []
        payloads: list[bytes] = []
        qos: list[int] = []
        retain: list[bool] = []
        mids: list[int] = []
        cache = self._topics
        v5 = self._v5
        while end - pos >= 2:
            header = data[pos]
            length = data[pos + 1]
            start = pos + 2
            if length & 0x80:  # the remaining length goes on (at most 4 bytes)
                length &= 0x7F
                shift = 7
                while start < end:
                    byte = data[start]
                    start += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        return pos, MQTTErrorCode.MQTT_ERR_PROTOCOL
                else:
                    break  # the length itself is incomplete
            stop = start + length
            if stop > end:
                break  # incomplete: wait for the rest
            if header & 0xF4 == _PUBLISH and length >= 2:  # PUBLISH, QoS 0 or 1
                topic_end = start + 2 + (data[start] << 8 | data[start + 1])
                body = topic_end + 2 if header & 0x02 else topic_end
                if v5:  # skip the properties: the raw contract keeps only the payload
                    if body >= stop or data[body] & 0x80:
                        body = stop + 1  # malformed, or >127 bytes of them: paho decides
                    else:
                        body += 1 + data[body]
                if topic_end > start + 2 and body <= stop:
                    name = data[start + 2 : topic_end]
                    topic = cache.get(name)
                    if topic is None:
                        try:
                            topic = name.decode()
                        except UnicodeDecodeError:
                            topic = None
                        else:
                            if len(cache) >= _TOPIC_CACHE_MAX:
                                cache.clear()
                            cache[name] = topic
                    if topic is not None:
                        topics.append(topic)
                        payloads.append(data[body:stop])
                        qos.append(header >> 1 & 1)
                        retain.append(header & 1 == 1)
                        mids.append(data[topic_end] << 8 | data[topic_end + 1] if header & 2 else 0)
                        pos = stop
                        continue
            # Anything else goes through paho, after the publishes before it.
            if payloads:
                self._sink(topics, payloads, qos, retain, mids)
                topics, payloads, qos, retain, mids = [], [], [], [], []
            rc = self._paho_handle(header, data[start:stop])
            pos = stop
            if rc > 0 or self._client._sock is not self._sock:
                return pos, rc
        if payloads:
            self._sink(topics, payloads, qos, retain, mids)
        return pos, MQTTErrorCode.MQTT_ERR_SUCCESS

    def _paho_handle(self, header: int, body: bytes) -> MQTTErrorCode:
        client = self._client
        client._in_packet = {
            "command": header,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": len(body),
            "packet": bytearray(body),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = client._packet_handle()
        except MalformedPacket as exc:
            client._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        client._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        return rc


def paho_version() -> tuple[int, int]:
    """The installed paho-mqtt's (major, minor)."""
    major, minor, *_ = (int(part) for part in paho.mqtt.__version__.split(".")[:2])
    return major, minor
