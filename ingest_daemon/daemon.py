"""The ingest daemon: MQTT (mTLS, persistent session, manual ack) -> raw Parquet batches.

Threads:
* paho's network loop reads the socket; ``_PublishReader`` frames whole runs of PUBLISH
  packets and ``_on_publishes`` appends each run to the buffer in one call (other
  packets, and ``_on_message`` for unusual publishes, go through paho as usual);
* the flusher cuts batches (rows/bytes/age), writes them to the object store — or the
  fsync'd spool when the store is down — and only then acknowledges their messages;
  with neither available it holds the batch and stops acknowledging (backpressure);
* the drainer uploads spooled batches once the store answers again.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_daemon.buffer import Batch, MessageBuffer
from ingest_daemon.config import IngestSettings
from ingest_daemon.metrics import IngestMetrics, serve
from ingest_daemon.spool import Spool
from iot_platform.mqtt_tls import tls_client
from iot_platform.objectstore import ObjectStore, ObjectStoreError
from iot_platform.rawbatch import EncodedBatch, encode_batch

log = logging.getLogger("ingest_daemon")


class RateLimitedLog:
    """At most one warning per ``interval_s`` per kind, with the count suppressed since."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) >= self.interval_s:
            suppressed = self._suppressed.pop(kind, 0)
            suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
            log.warning(message + suffix, *args)
            self._last[kind] = now
        else:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1


@dataclass
class _Pending:
    """A batch encoded and waiting to become durable."""

    encoded: EncodedBatch
    acks: list[tuple[int, int, list[int]]]  # (epoch, qos, packet ids)


_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_WORD = 0x4002_0000  # PUBACK, remaining length 2; OR the packet id into the low half
_RECV_SIZE = 64 * 1024  # a TLS read returns at most one 16 KiB record anyway
_READ_BUDGET = 1024 * 1024  # per call, so writes (acks) and keepalive get their turn
_TOPIC_CACHE_MAX = 50_000

# (topics, payloads, qos, retain, packet ids) of consecutive PUBLISH packets
PublishSink = Callable[[list[str], list[bytes], list[int], list[bool], list[int]], None]


class _PublishReader:
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
    stock path in place, if they are missing.
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
    def install(cls, client: mqtt.Client, sink: PublishSink) -> _PublishReader | None:
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


class IngestDaemon:
    def __init__(self, settings: IngestSettings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store
        self.metrics = IngestMetrics()
        self.buffer = MessageBuffer(settings.max_rows, settings.max_bytes)
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes)
        self._batches: queue.Queue[Batch] = queue.Queue()
        self._seq = 0
        self._epoch = 0
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._drain_wakeup = threading.Event()
        self._connected = threading.Event()
        self._ratelog = RateLimitedLog()
        self._threads: list[threading.Thread] = []
        self._http = None
        self.client = self._make_client()
        self._reader = _PublishReader.install(self.client, self._on_publishes)
        self._update_spool_gauges()

    # ---- MQTT ---------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = tls_client(
            s.client_id,
            ca_file=s.ca_file,
            cert_file=s.cert_file,
            key_file=s.key_file,
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_maximum
        return props

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self._epoch += 1
        self._connected.set()
        self.metrics.connected.set(1)
        log.info(
            "connected to %s:%s (session present: %s); subscribing %s",
            self.settings.broker_host,
            self.settings.broker_port,
            flags.session_present,
            ", ".join(self.settings.subscriptions),
        )
        client.subscribe([(topic, 1) for topic in self.settings.subscriptions])

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _props) -> None:
        refused = [
            topic
            for topic, rc in zip(self.settings.subscriptions, reason_codes, strict=False)
            if rc.is_failure
        ]
        if refused:
            log.error("broker refused subscriptions %s: check the ingest ACL", refused)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, _userdata, message: mqtt.MQTTMessage) -> None:
        # Hot path: no decoding, no metrics locks per message — counted per batch.
        if self._stopping.is_set():
            return  # not buffered, not acked: the persistent session redelivers it
        # Every payload the broker delivered is kept: the broker enforces the one size
        # limit (IOT_MQTT_MAX_PAYLOAD_BYTES); the decoder rejects what it will not parse.
        qos = message.qos
        full = self.buffer.append(
            time.time_ns() // 1000,
            message.topic,
            message.payload,
            qos,
            bool(message.retain),
            message.mid if qos else 0,
            self._epoch,
        )
        if full is not None:
            self._batches.put(full)

    def _on_publishes(
        self,
        topics: list[str],
        payloads: list[bytes],
        qos: list[int],
        retain: list[bool],
        mids: list[int],
    ) -> None:
        """A run of QoS 0/1 publishes from one socket read (``_PublishReader``), in order.

        They share one receive timestamp: they arrived in the same read.
        """
        if self._stopping.is_set():
            return  # not buffered, not acked: the persistent session redelivers them
        for batch in self.buffer.extend(
            time.time_ns() // 1000, topics, payloads, qos, retain, mids, self._epoch
        ):
            self._batches.put(batch)

    # ---- durability -------------------------------------------------------------
    def _encode(self, batch: Batch) -> _Pending:
        self._seq += 1
        encoded = encode_batch(
            received_at_us=batch.received_at_us,
            topics=batch.topics,
            payloads=batch.payloads,
            qos=batch.qos,
            retain=batch.retain,
            instance=self.settings.instance_id,
            seq=self._seq,
        )
        return _Pending(encoded, batch.ack_runs())

    def _upload(self, key: str, data: bytes) -> bool:
        started = time.monotonic()
        try:
            self.store.put(key, data)
        except ObjectStoreError as exc:
            self.metrics.upload_failures.inc()
            self._ratelog.warning("upload", "object store put of %s failed: %s", key, exc)
            return False
        self.metrics.upload_seconds.observe(time.monotonic() - started)
        return True

    def _make_durable(self, pending: _Pending) -> bool:
        key, data = pending.encoded.key.key, pending.encoded.data
        if self.spool.count == 0 and self._upload(key, data):
            destination = "store"
        elif self.spool.save(key, data):
            destination = "spool"
            self._update_spool_gauges()
            self._drain_wakeup.set()
        else:
            return False
        self.metrics.batches.labels(destination).inc()
        self.metrics.bytes_written.labels(destination).inc(len(data))
        return True

    def _acknowledge(self, acks: list[tuple[int, int, list[int]]]) -> None:
        epoch = self._epoch
        sent = stale = 0
        for ack_epoch, qos, mids in acks:
            if ack_epoch != epoch:
                stale += len(mids)
                continue
            if qos == 1 and self._reader is not None:
                self._reader.send_pubacks(mids)
            else:
                for mid in mids:
                    self.client.ack(mid, qos)
            sent += len(mids)
        self.metrics.acknowledged.inc(sent)
        self.metrics.stale_acks.inc(stale)
        self.metrics.pending_acks.dec(sent + stale)

    def _flush_one(self, batch: Batch, *, deadline: float | None = None) -> bool:
        """Encode, make durable (retrying with backoff while neither target has room), ack."""
        self.metrics.received.inc(len(batch))
        self.metrics.pending_acks.inc(batch.ack_count)
        pending = self._encode(batch)
        delay = 0.5
        while not self._make_durable(pending):
            self.metrics.backpressure.set(1)
            self._ratelog.warning(
                "backpressure",
                "store unreachable and spool full (%d bytes of %d): holding %d messages unacked",
                self.spool.bytes,
                self.spool.max_bytes,
                len(batch),
            )
            if deadline is not None and time.monotonic() > deadline:
                log.error(
                    "giving up on batch %s at shutdown; the broker keeps its %d messages",
                    pending.encoded.key.key,
                    len(batch),
                )
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        self.metrics.backpressure.set(0)
        self._acknowledge(pending.acks)
        return True

    def _flusher(self) -> None:
        tick = min(self.settings.max_age_s / 4, 0.25)
        while not self._stop.is_set():
            try:
                batch = self._batches.get(timeout=tick)
            except queue.Empty:
                batch = self.buffer.take_if_older_than(self.settings.max_age_s)
                if batch is None:
                    continue
            self._flush_one(batch)

    def _drainer(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._drain_wakeup.wait(timeout=delay)
            self._drain_wakeup.clear()
            # Back off while the store is down; poll at 1 s again once it answers.
            delay = 1.0 if self.drain_spool() else min(delay * 2, 15.0)

    def drain_spool(self) -> bool:
        """Upload spooled batches oldest first; False if the store is still unreachable."""
        for key, path in self.spool.pending():
            if self._stop.is_set():
                return True
            if not self._upload(key, path.read_bytes()):
                return False
            self.spool.remove(path)
            self.metrics.spool_drained.inc()
            self._update_spool_gauges()
            log.info("drained spooled batch %s", key)
        return True

    def _update_spool_gauges(self) -> None:
        self.metrics.spool_files.set(self.spool.count)
        self.metrics.spool_bytes.set(self.spool.bytes)

    # ---- lifecycle --------------------------------------------------------------
    def health(self) -> dict[str, object]:
        alive = all(t.is_alive() for t in self._threads)
        connected = self._connected.is_set()
        return {
            "healthy": alive and connected,
            "connected": connected,
            "threads_alive": alive,
            "spool_files": self.spool.count,
            "spool_bytes": self.spool.bytes,
            "backpressure": bool(self.metrics.backpressure._value.get()),
        }

    def start(self) -> None:
        s = self.settings
        self._http = serve(self.metrics, s.metrics_host, s.metrics_port, self.health)
        log.info(
            "ingest %s: store %s, spool %s (max %d bytes), metrics http://%s:%d/metrics",
            s.instance_id,
            self.store.describe(),
            s.spool_dir,
            s.spool_max_bytes,
            s.metrics_host,
            self.metrics_port,
        )
        if self.spool.count:
            log.info("replaying %d spooled batches before connecting", self.spool.count)
            self.drain_spool()
        for target, name in ((self._flusher, "flusher"), (self._drainer, "drainer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.client.connect_async(
            s.broker_host,
            s.broker_port,
            keepalive=s.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()

    @property
    def metrics_port(self) -> int:
        return self._http.server_address[1] if self._http else self.settings.metrics_port

    def stop(self) -> bool:
        """Flush and acknowledge everything received, then disconnect. True if all durable."""
        # Never unsubscribe: that would drop the persistent session's subscription and the
        # broker would stop queueing for us while we are down.
        self._stopping.set()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.shutdown_timeout_s)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        complete = True
        leftovers: list[Batch] = []
        while not self._batches.empty():
            leftovers.append(self._batches.get_nowait())
        last = self.buffer.take()
        if last is not None:
            leftovers.append(last)
        for batch in leftovers:
            complete = self._flush_one(batch, deadline=deadline) and complete
        self.client.disconnect()
        self.client.loop_stop()
        if self._http is not None:
            self._http.shutdown()
        log.info(
            "stopped: %s",
            "everything durable and acknowledged"
            if complete
            else "some messages left unacknowledged for redelivery",
        )
        return complete
