"""The ingest daemon: MQTT (mTLS, persistent session, manual ack) -> raw Parquet batches.

Threads:
* paho's network loop reads the socket; ``PublishReader`` (``fastpath``) frames runs of PUBLISH
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
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_daemon.buffer import Batch, MessageBuffer
from ingest_daemon.config import IngestSettings
from ingest_daemon.fastpath import PublishReader
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
        self._http: ThreadingHTTPServer | None = None
        self.client = self._make_client()
        self._reader = PublishReader.install(self.client, self._on_publishes)
        self.metrics.fast_path.set(1 if self._reader is not None else 0)
        self._backpressure = False
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
        """A run of QoS 0/1 publishes from one socket read (``PublishReader``), in order.

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
            self._set_backpressure(True)
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
        self._set_backpressure(False)
        self._acknowledge(pending.acks)
        return True

    def _set_backpressure(self, on: bool) -> None:
        """Kept as a plain attribute for /healthz and exported as the gauge (a metric's
        own value is private to prometheus_client)."""
        self._backpressure = on
        self.metrics.backpressure.set(1 if on else 0)

    def _flusher(self) -> None:
        tick = min(self.settings.max_age_s / 4, 0.25)
        while not self._stop.is_set():
            batch: Batch | None
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
            "backpressure": self._backpressure,
            "fast_path": self._reader is not None,
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
