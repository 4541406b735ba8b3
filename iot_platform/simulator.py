"""Device simulator: a small fleet that speaks every topic family over mTLS, with faults.

Each simulated device has its own certificate (CN = device id, issued through the
enrollment job by the caller's ``enroll`` function) and its own MQTT connection, so the
broker's per-CN ACLs apply exactly as to real devices. Faults are injectable per device:
sequence gaps, duplicates, malformed payloads, clock skew and silence.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import logging
import random
import secrets
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from iot_platform.mqtt_tls import tls_client

log = logging.getLogger(__name__)

KINDS = ("meter-dc", "meter-ac", "sensor", "controller")
FAULTS = ("gap", "duplicate", "malformed", "skew", "silence")
METER_METRICS: dict[str, dict[str, tuple[float, float, str]]] = {
    "meter-dc": {
        "voltage_dc": (700, 800, "V"),
        "current_dc": (5, 40, "A"),
        "power_dc": (3500, 32000, "W"),
    },
    "meter-ac": {  # a 25 kV 50 Hz rail meter, as the v2 protocol's AC meters are
        "voltage_ac": (24_500, 25_500, "V"),
        "current_ac": (20, 400, "A"),
        "power_ac": (500_000, 10_000_000, "W"),
        "frequency": (49.9, 50.1, "Hz"),
    },
}
# device_parameters rows a controller needs (mode, connector, component, encoding, metric, unit,
# scale); the caller registers them with the device.
CONTROLLER_PARAMETERS = [
    ("auto", "1", "relays", "boolean_map", "relay", None, None),
    ("auto", "1", "power", "hex_to_float", "power_ac", "W", 1.0),
    ("auto", "1", "enabled", "boolean", "enabled", None, None),
    ("auto", "1", "state", "raw_string", "state", None, None),
]


SEQ_MODULUS = 2**32  # seq wraps at 2^32-1 (DESIGN §4)


def _first_seq() -> int:
    """Where a simulated device's seq starts: the clock in milliseconds, so a restarted
    simulator continues above the seqs it already sent (the warehouse keeps the first
    stored (device_id, seq) for IOT_TS_MAX_AGE_S; restarting at 1 would look like a replay)."""
    return time.time_ns() // 1_000_000 % SEQ_MODULUS


@dataclass
class SimDevice:
    device_id: str
    kind: str
    faults: frozenset[str] = frozenset()
    send_interval_s: float = 10.0
    hello_interval_s: float = 30.0
    seq: int = field(default_factory=_first_seq)
    sent: int = 0
    client: mqtt.Client | None = None
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class FleetReport:
    """What was published, so a test can compare it with the warehouse."""

    published: Counter[str] = field(default_factory=Counter)  # kind of message -> count
    good_measurements: Counter[str] = field(default_factory=Counter)  # device -> measurements
    faults: dict[str, list[str]] = field(default_factory=dict)  # device -> faults injected
    skipped_seq: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "published": dict(self.published),
            "good_measurements": dict(self.good_measurements),
            "faults": self.faults,
            "skipped_seq": self.skipped_seq,
        }


def device_id_for(kind: str, n: int, prefix: str) -> str:
    if kind == "controller":  # parametrised devices are f2-<12 hex digits>
        return f"f2-{zlib.crc32(prefix.encode()):08x}{n:04x}"
    return f"{prefix}-{kind}-{n:03d}"


def plan_fleet(
    count: int,
    faults: dict[str, set[str]] | None = None,
    prefix: str = "sim",
    send_interval_s: float = 10.0,
) -> list[SimDevice]:
    """``count`` devices cycling through the kinds; ``faults`` maps device ids to faults."""
    faults = faults or {}
    fleet = []
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        device_id = device_id_for(kind, n, prefix)
        fleet.append(
            SimDevice(
                device_id,
                kind,
                frozenset(faults.get(device_id, ())),
                send_interval_s=send_interval_s,
                rng=random.Random(device_id),  # noqa: S311 - simulated readings, not secrets
            )
        )
    return fleet


class Fleet:
    """Connects every device and publishes on schedule until ``stop()``."""

    def __init__(
        self,
        devices: list[SimDevice],
        *,
        host: str,
        port: int,
        ca_file: Path,
        credentials: Callable[[SimDevice], tuple[Path, Path]],
        silence_after_s: float = 20.0,
    ) -> None:
        self.devices = devices
        self.host, self.port, self.ca_file = host, port, ca_file
        self.credentials = credentials
        self.silence_after_s = silence_after_s
        self.report = FleetReport()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started = 0.0

    # ---- connections ------------------------------------------------------------------
    def connect(self, timeout: float = 20.0) -> None:
        for device in self.devices:
            cert, key = self.credentials(device)
            client = tls_client(
                f"{device.device_id}-sim", ca_file=self.ca_file, cert_file=cert, key_file=key
            )
            if device.kind.startswith("meter"):
                client.will_set(
                    f"iot/{device.device_id}/status",
                    self._status(device, "offline"),
                    qos=1,
                    retain=True,
                )
            connected = threading.Event()
            client.on_connect = lambda *_args, ev=connected: ev.set()
            client.connect(self.host, self.port, keepalive=30)
            client.loop_start()
            if not connected.wait(timeout):
                raise ConnectionError(f"{device.device_id}: the broker refused or did not answer")
            device.client = client
            self.report.faults[device.device_id] = sorted(device.faults)
            if device.kind.startswith("meter"):
                self._publish(
                    device,
                    f"iot/{device.device_id}/status",
                    self._status(device, "online"),
                    retain=True,
                    what="status",
                )

    def close(self) -> None:
        for device in self.devices:
            if device.client is not None:
                device.client.disconnect()
                device.client.loop_stop()

    # ---- payloads -----------------------------------------------------------------------
    def _ts(self, device: SimDevice) -> str:
        now = dt.datetime.now(dt.UTC)
        if "skew" in device.faults:
            now -= dt.timedelta(minutes=10)
        return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def _status(self, device: SimDevice, status: str) -> bytes:
        return json.dumps(
            {"v": 2, "device_id": device.device_id, "ts": self._ts(device), "status": status}
        ).encode()

    def _publish(
        self,
        device: SimDevice,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        what: str,
    ) -> None:
        assert device.client is not None
        device.client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            self.report.published[what] += 1

    def _next_seq(self, device: SimDevice) -> int:
        device.seq = (device.seq + 1) % SEQ_MODULUS
        if "gap" in device.faults and device.seq % 7 == 0:
            self.report.skipped_seq.setdefault(device.device_id, []).append(device.seq)
            device.seq = (device.seq + 1) % SEQ_MODULUS  # this seq number is never sent
        return device.seq

    def _telemetry(self, device: SimDevice) -> None:
        if device.kind == "sensor":
            value = round(device.rng.uniform(18, 26), 2)
            self._publish(
                device, f"devices/{device.device_id}/temperature", str(value), what="scalar"
            )
            self._count_good(device, 1)
            return
        if device.kind == "controller":
            self._controller(device)
            return
        device.sent += 1
        if "malformed" in device.faults and device.sent % 5 == 0:
            self._publish(
                device, f"iot/{device.device_id}/telemetry", b'{"v":2,"seq":', what="malformed"
            )
            return
        measurements = [
            {"type": metric, "val": round(device.rng.uniform(lo, hi), 3), "unit": unit}
            for metric, (lo, hi, unit) in METER_METRICS[device.kind].items()
        ]
        body = json.dumps(
            {
                "v": 2,
                "device_id": device.device_id,
                "ts": self._ts(device),
                "seq": self._next_seq(device),
                "msg_type": "telemetry",
                "measurements": measurements,
            }
        )
        self._publish(device, f"iot/{device.device_id}/telemetry", body, what="telemetry")
        self._count_good(device, len(measurements))
        if "duplicate" in device.faults and device.seq % 5 == 0:
            self._publish(device, f"iot/{device.device_id}/telemetry", body, what="duplicate")

    def _controller(self, device: SimDevice) -> None:
        base = f"{device.device_id}/auto/1"
        relays = "".join(device.rng.choice("01") for _ in range(4))
        power = struct.pack(">f", round(device.rng.uniform(100, 2000), 1)).hex()
        self._publish(device, f"tele/{base}/relays", relays, what="parametrised")
        self._publish(device, f"stat/{base}/power", power, what="parametrised")
        self._publish(
            device, f"stat/{base}/enabled", device.rng.choice(["ON", "OFF"]), what="parametrised"
        )
        self._count_good(device, len(relays) + 2)

    def _hello(self, device: SimDevice) -> None:
        if not device.kind.startswith("meter"):
            return
        body = json.dumps(
            {
                "v": 2,
                "device_id": device.device_id,
                "ts": self._ts(device),
                "seq": self._next_seq(device),
                "msg_type": "hello",
                "fw_version": "2.1.0",
                "uptime_s": int(time.monotonic()),
                "broker_connections": 1,
                "buf_usage_pct": 3,
                "temp_internal": 41.5,
            }
        )
        self._publish(device, f"iot/{device.device_id}/hello", body, what="hello")

    def _count_good(self, device: SimDevice, measurements: int) -> None:
        with self._lock:
            self.report.good_measurements[device.device_id] += measurements

    # ---- schedule ------------------------------------------------------------------------
    def run(self, duration_s: float | None = None) -> FleetReport:
        """Publish until ``stop()`` or ``duration_s``; returns what was published."""
        self._started = time.monotonic()
        deadline = None if duration_s is None else self._started + duration_s
        queue: list[tuple[float, int, str]] = []
        for i, device in enumerate(self.devices):
            offset = device.rng.uniform(0, min(1.0, device.send_interval_s))
            heapq.heappush(queue, (self._started + offset, i, "telemetry"))
            heapq.heappush(queue, (self._started + offset, i, "hello"))
        while queue and not self._stop.is_set():
            due, i, what = heapq.heappop(queue)
            if deadline is not None and due > deadline:
                break
            self._stop.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                break
            device = self.devices[i]
            silent = (
                "silence" in device.faults
                and time.monotonic() - self._started > self.silence_after_s
            )
            if not silent:
                (self._telemetry if what == "telemetry" else self._hello)(device)
            interval = device.send_interval_s if what == "telemetry" else device.hello_interval_s
            heapq.heappush(queue, (due + interval, i, what))
        for device in self.devices:  # let QoS 1 publishes reach the broker
            if device.client is not None:
                device.client.loop_write()
        time.sleep(1)
        return self.report

    def stop(self) -> None:
        self._stop.set()


def random_prefix() -> str:
    return f"sim{secrets.token_hex(2)}"
