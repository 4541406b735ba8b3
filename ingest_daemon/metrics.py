"""Prometheus metrics and the /metrics + /healthz HTTP endpoint of the daemon."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


class IngestMetrics:
    """One registry per daemon instance (tests run several in one process).

    Names follow Prometheus conventions: counters end in ``_total`` (the client adds it),
    a unit is a suffix in base units (``_bytes``, ``_seconds``), and the standard
    ``process_*`` (CPU, memory, open files) and ``python_info`` series are exported too.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.received = Counter("ingest_messages_received", "MQTT messages received", registry=r)
        self.acknowledged = Counter(
            "ingest_messages_acknowledged", "messages acknowledged to the broker", registry=r
        )
        self.stale_acks = Counter(
            "ingest_stale_acks_skipped",
            "acks not sent because the connection that delivered them is gone",
            registry=r,
        )
        self.pending_acks = Gauge(
            "ingest_pending_acks", "received, not yet durable and acknowledged", registry=r
        )
        self.batches = Counter(
            "ingest_batches_written", "raw batches made durable", ["destination"], registry=r
        )
        self.bytes_written = Counter(
            "ingest_written_bytes", "Parquet bytes made durable", ["destination"], registry=r
        )
        self.upload_seconds = Histogram(
            "ingest_upload_seconds",
            "object store PUT latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.upload_failures = Counter(
            "ingest_upload_failures", "object store PUTs that failed", registry=r
        )
        self.spool_files = Gauge("ingest_spool_files", "batches waiting in the spool", registry=r)
        self.spool_bytes = Gauge("ingest_spool_bytes", "bytes waiting in the spool", registry=r)
        self.spool_drained = Counter(
            "ingest_spool_drained", "spooled batches uploaded later", registry=r
        )
        self.backpressure = Gauge(
            "ingest_backpressure",
            "1 while a batch can be made durable neither in the store nor the spool",
            registry=r,
        )
        self.connected = Gauge("ingest_connected", "1 while connected to the broker", registry=r)
        self.fast_path = Gauge(
            "ingest_fast_path",
            "1 when the fast PUBLISH reader is active (verified paho-mqtt), 0 on paho's path",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def serve(
    metrics: IngestMetrics, host: str, port: int, health: Callable[[], dict[str, object]]
) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on a daemon thread; port 0 picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                status = health()
                code = 200 if status.get("healthy") else 503
                self._send(code, json.dumps(status).encode(), "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:  # scrapes are not worth a log line
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
