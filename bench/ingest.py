"""Ingest throughput benchmark: real broker (mTLS), real daemon process, local object store.

Run as ``.venv/bin/python bench/ingest.py [--messages N] [--publishers K]``. It

1. makes a fresh PKI in a temp folder (CA, broker cert, the ``ingest`` service cert and one
   device cert per publisher) and starts Mosquitto on a free port from the shared template;
2. writes ~200-byte envelope-v2 telemetry payloads with drifting values, each with a
   unique (device_id, seq), in files of at most ``CHUNK_LINES`` lines per device;
3. **ceiling**: a bare ``mosquitto_sub -q 1`` (ingest identity) subscribes, K devices
   publish in parallel — each with ``mosquitto_pub -q 1 -l`` over its chunk files in turn
   (its own certificate, ACL ``iot/%u/#``) — and the time from the first publish until
   the subscriber has all N messages gives the broker's delivery rate;
4. **daemon**: ``python -m ingest_daemon`` (local object store in the temp folder) is
   started and subscribed, the same N messages are published again, and the time from
   the first publish until its ``ingest_messages_acknowledged_total`` metric has grown
   by N (a message is acknowledged only once durable) gives the end-to-end rate;
5. with the daemon still running, reads every stored batch back with ``read_batch`` and
   counts the distinct ids (``lost`` = N - distinct), then stops it (SIGTERM) and checks
   that it exits cleanly;
6. ``--backlog`` (diagnostic): stops the daemon, publishes N more into its persistent
   session, restarts it and times the drain with no publishers competing for the CPU.

Progress goes to stderr, with where the CPU went per phase (broker, MQTT clients, daemon,
and "other": the rest of the machine, i.e. other jobs). The last stdout line is one JSON
object with ``msgs_per_s``, ``ceiling_msgs_per_s``, ``ratio``, ``lost``,
``daemon_rss_mb``, ``parquet_bytes_per_msg``, ``json_bytes_per_msg``, ``messages`` (and
diagnostic extras); on failure it is ``{"error": ...}`` and the exit code is 1. Every
process it started is ended by its PID, also on failure or Ctrl-C. ``--profile FILE``
samples the daemon with py-spy (not a project dependency: ``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from iot_platform.broker_control import INGEST_IDENTITY
from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.pki import CertificateAuthority, init_pki
from iot_platform.rawbatch import KEY_ROOT, read_batch
from iot_platform.services.mosquitto import BrokerConfig, MosquittoBroker
from iot_platform.services.process import ChildProcess, ServiceError, free_port, log_tail

TIMEOUT_S = 600.0
STALL_S = 20.0  # no progress for this long after the publishers finished: give up
# One mosquitto_pub connection may carry fewer than 65,536 QoS 1 messages: with more
# lines on stdin, packet ids repeat while earlier ones are still queued and Mosquitto
# 2.0.11 drops the client ("disconnected due to out of memory") — so publish in chunks.
CHUNK_LINES = 50_000
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench +{time.monotonic() - _T0:7.2f}s] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ---- payloads ---------------------------------------------------------------------
_MEASUREMENTS = (  # (type, unit, centre, spread, decimals)
    ("voltage_dc", "V", 756.0, 8.0, 1),
    ("current_dc", "A", 12.0, 3.0, 2),
    ("power_ac", "kW", 8.6, 2.5, 3),
    ("temp_module", "C", 41.0, 6.0, 1),
    ("frequency", "Hz", 50.0, 0.05, 3),
)


def write_payloads(
    directory: Path, device_id: str, count: int, rng: random.Random
) -> tuple[int, list[Path]]:
    """``count`` telemetry lines (~200 bytes, values drifting per device) in files of at most
    ``CHUNK_LINES`` lines; returns (payload bytes, files)."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    levels = [centre for _, _, centre, _, _ in _MEASUREMENTS]
    total = 0
    lines = []
    for seq in range(count):
        ts = (start + dt.timedelta(milliseconds=250 * seq)).isoformat(timespec="milliseconds")
        ts = ts.replace("+00:00", "Z")
        picks = rng.sample(range(len(_MEASUREMENTS)), 2)
        parts = []
        for i in sorted(picks):
            kind, unit, centre, spread, decimals = _MEASUREMENTS[i]
            levels[i] += rng.gauss(0.0, spread / 20) + (centre - levels[i]) * 0.01
            parts.append(f'{{"type":"{kind}","val":{levels[i]:.{decimals}f},"unit":"{unit}"}}')
        line = (
            f'{{"v":2,"device_id":"{device_id}","ts":"{ts}","seq":{seq},'
            f'"msg_type":"telemetry","measurements":[{",".join(parts)}]}}\n'
        )
        total += len(line) - 1
        lines.append(line)
    paths = []
    for n, start in enumerate(range(0, count, CHUNK_LINES)):
        path = directory / f"{device_id}.{n:04d}.jsonl"
        path.write_text("".join(lines[start : start + CHUNK_LINES]))
        paths.append(path)
    return total, paths


# ---- processes --------------------------------------------------------------------
class Children:
    """Short-lived MQTT client processes, every one ended by its PID on the way out."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
        with self._lock:  # publisher threads start processes too
            if self._closed:
                raise BenchError("shutting down")
            proc = subprocess.Popen(argv, **kwargs)
            self._procs.append(proc)
            return proc

    def stop_all(self) -> None:
        with self._lock:
            self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()


class Bench:
    def __init__(self, root: Path, messages: int, publishers: int, inflight: int) -> None:
        self.root = root
        self.publishers = publishers
        self.inflight = inflight
        self.children = Children()
        self.ca = CertificateAuthority(root / "certs", secrets.token_urlsafe(24))
        self.port = free_port()
        self.broker: MosquittoBroker | None = None
        self.daemon: ChildProcess | None = None
        self.devices = [f"bench-{i}" for i in range(publishers)]
        counts = [messages // publishers + (i < messages % publishers) for i in range(publishers)]
        self.counts = dict(zip(self.devices, counts, strict=True))
        self.messages = messages
        self.json_bytes = 0
        self.profile: Path | None = None
        self.chunks: dict[str, list[Path]] = {}
        self.publish_errors: list[str] = []

    # -- setup --
    def setup(self) -> None:
        log(f"PKI in {self.ca.certs_dir}")
        init_pki(
            self.ca,
            broker_hosts=["localhost", "127.0.0.1"],
            services=[INGEST_IDENTITY],
            crl_days=7,
        )
        rng = random.Random(20240601)  # noqa: S311 - synthetic data, not security
        payloads = self.root / "payloads"
        payloads.mkdir()
        for device in self.devices:
            self.ca.issue_device_certificate(device)
            size, self.chunks[device] = write_payloads(payloads, device, self.counts[device], rng)
            self.json_bytes += size
        log(
            f"{self.messages} payloads for {self.publishers} devices, "
            f"{self.json_bytes / self.messages:.1f} bytes each on average"
        )
        config = BrokerConfig(
            port=self.port,
            certs_dir=self.ca.certs_dir,
            config_dir=self.root / "mosquitto" / "config",
            data_dir=self.root / "mosquitto" / "data",
        )
        self.broker = MosquittoBroker(config).start()
        log(f"mosquitto pid {self.broker.process.pid} on port {self.port}")

    def client_args(self, identity: str, *, service: bool = False) -> list[str]:
        cert, key = self.ca.service_paths(identity) if service else self.ca.device_paths(identity)
        return [
            "--cafile", str(self.ca.ca_cert_path), "--cert", str(cert), "--key", str(key),
            "-h", "localhost", "-p", str(self.port),
        ]  # fmt: skip

    def publish_one(self, device: str, topic: str, body: str, *, retain: bool = False) -> None:
        argv = ["mosquitto_pub", *self.client_args(device), "-q", "1", "-t", topic]
        argv += ["-n"] if not body else ["-m", body]
        argv += ["-r"] if retain else []
        proc = self.children.popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise BenchError(f"mosquitto_pub {topic} failed: {err.decode(errors='replace')}")

    def publish_all(self) -> tuple[float, Callable[[], float | None]]:
        """One publisher thread per device, each running ``mosquitto_pub -l`` over that
        device's chunk files in turn; returns (t0, finished_at()) — None while running."""
        self.publish_errors = []
        done: list[float] = []
        pending = [len(self.devices)]
        lock = threading.Lock()

        def publish_device(device: str) -> None:
            try:
                for n, chunk in enumerate(self.chunks[device]):
                    argv = [
                        "mosquitto_pub", *self.client_args(device), "-q", "1", "-l",
                        "-M", str(self.inflight), "-i", f"{device}-pub{n}",
                        "-t", f"iot/{device}/telemetry",
                    ]  # fmt: skip
                    with chunk.open("rb") as lines:
                        proc = self.children.popen(argv, stdin=lines, stderr=subprocess.PIPE)
                    _, err = proc.communicate()
                    if proc.returncode != 0 or err.strip():
                        self.publish_errors.append(
                            f"{device} chunk {n}: exit {proc.returncode} {err.decode()[-300:]}"
                        )
            finally:
                with lock:
                    pending[0] -= 1
                    if pending[0] == 0:
                        done.append(time.monotonic())

        t0 = time.monotonic()
        for device in self.devices:
            threading.Thread(
                target=publish_device, args=(device,), name=f"pub-{device}", daemon=True
            ).start()
        return t0, lambda: done[0] if done else None

    # -- phase 1: broker ceiling --
    def ceiling(self) -> tuple[float, float, dict[str, int]]:
        marker_device = self.devices[0]
        marker_topic = f"iot/{marker_device}/status"
        self.publish_one(
            marker_device, marker_topic, '{"v":2,"status":"online","bench":"ready"}', retain=True
        )
        argv = [
            "mosquitto_sub", *self.client_args(INGEST_IDENTITY, service=True),
            "-q", "1", "-V", "mqttv5", "-i", "bench-ceiling", "-C", str(self.messages + 1),
            "-t", "iot/+/telemetry", "-t", marker_topic,
        ]  # fmt: skip
        # Output to a file, not a pipe: reading 40 MB through Python would cost CPU the
        # broker and the subscriber need.
        received = self.root / "ceiling.out"
        with received.open("wb") as out:
            sub = self.children.popen(argv, stdout=out, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while b"\n" not in received.read_bytes()[:4096]:  # the retained marker: subscribed
            if sub.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"ceiling subscriber did not start: {sub.stderr.read().decode()}")
            time.sleep(0.02)
        log("ceiling: subscriber ready, publishing")
        cpu0 = self._cpu_snapshot()
        t0, published_at = self.publish_all()
        size, changed = -1, t0
        while sub.poll() is None:
            now = time.monotonic()
            if received.stat().st_size != size:
                size, changed = received.stat().st_size, now
            elif (published_at() is not None and now - changed > STALL_S) or (now - t0 > TIMEOUT_S):
                raise BenchError(self._stalled("ceiling subscriber"))
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        with received.open("rb") as lines:
            count = sum(1 for _ in lines) - 1  # minus the marker
        received.unlink()
        if count != self.messages:
            raise BenchError(f"ceiling subscriber got {count} of {self.messages}")
        while published_at() is None:
            time.sleep(0.05)
        pub_elapsed = published_at() - t0
        for error in self.publish_errors:
            log(f"publisher error: {error}")
        cpu = self._cpu_report("ceiling", cpu0)
        self.publish_one(marker_device, marker_topic, "", retain=True)  # clear the marker
        rate = self.messages / elapsed
        log(
            f"ceiling: {self.messages} delivered in {elapsed:.2f}s = {rate:,.0f} msg/s "
            f"(publishers done after {pub_elapsed:.2f}s = {self.messages / pub_elapsed:,.0f} msg/s)"
        )
        return rate, self.messages / pub_elapsed, cpu

    # -- phase 2: the daemon --
    def start_daemon(self, extra_env: dict[str, str]) -> int:
        metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IOT_", "INGEST_"))}
        env.update(
            IOT_HOME=str(self.root / "home"),
            IOT_CERTS_DIR=str(self.ca.certs_dir),
            IOT_BROKER_HOST="127.0.0.1",
            IOT_BROKER_PORT=str(self.port),
            IOT_OBJECT_STORE="local",
            IOT_LOCAL_STORE_DIR=str(self.root / "objects"),
            INGEST_INSTANCE_ID="bench",
            INGEST_SPOOL_DIR=str(self.root / "spool"),
            INGEST_METRICS_HOST="127.0.0.1",
            INGEST_METRICS_PORT=str(metrics_port),
            # A trailing partial batch waits at most this long (default 5 s) before it is
            # written: keep it short so the tail does not dominate a ~10 s measurement.
            INGEST_MAX_AGE_S="1.0",
        )
        env.update(extra_env)
        self.daemon = ChildProcess(
            "ingest-bench",
            [sys.executable, "-m", "ingest_daemon"],
            self.root / "ingest.log",
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        ).start()
        self.daemon.wait_until(
            lambda: bool(_health(metrics_port).get("connected")), timeout=30, what="MQTT connected"
        )
        log(f"daemon pid {self.daemon.pid} connected (metrics port {metrics_port})")
        return metrics_port

    def daemon_run(self, extra_env: dict[str, str]) -> dict[str, object]:
        port = self.start_daemon(extra_env)
        assert self.daemon is not None
        # Readiness: the shared subscription gets no retained messages, so publish a live
        # status marker until the daemon has acknowledged it (subscribed and flushing).
        markers = 0
        last = 0.0
        deadline = time.monotonic() + 30
        while _acked(port) < 1:
            if time.monotonic() > deadline:
                raise BenchError(f"daemon never acknowledged a marker:\n{self._daemon_log()}")
            if markers == 0 or time.monotonic() > last + 2.5:
                self.publish_one(self.devices[0], f"iot/{self.devices[0]}/status", "{}")
                markers += 1
                last = time.monotonic()
            time.sleep(0.05)
        while _acked(port) < markers:  # a second marker may still be in a batch
            time.sleep(0.05)
        baseline = _acked(port)
        log(f"daemon: subscribed ({baseline:.0f} marker(s) acknowledged), publishing")
        profiler = self._start_profiler()
        cpu0 = self._cpu_snapshot()
        t0, published_at = self.publish_all()
        target = baseline + self.messages
        deadline = t0 + TIMEOUT_S
        rss_peak = 0
        acked = baseline
        last_log = t0
        finished = None
        changed = t0
        while True:
            previous, acked = acked, _acked(port)
            now = time.monotonic()
            if acked != previous:
                changed = now
            elif published_at() is not None and now - changed > STALL_S:
                raise BenchError(self._stalled(f"daemon at {acked - baseline:.0f} acked"))
            rss_peak = max(rss_peak, _rss_kb(self.daemon.pid, "VmRSS"))
            if acked >= target:
                finished = now
                break
            if not self.daemon.running():
                raise BenchError(f"daemon exited during the run:\n{self._daemon_log()}")
            if now > deadline:
                log(f"daemon: timed out with {acked - baseline:.0f} of {self.messages} acked")
                break
            if now - last_log >= 2:
                log(f"daemon: {acked - baseline:,.0f} acknowledged after {now - t0:.1f}s")
                last_log = now
            time.sleep(0.1)  # each scrape costs the daemon a little CPU
        rss_peak = max(rss_peak, _rss_kb(self.daemon.pid, "VmHWM"))
        while published_at() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pub_done = published_at()
        for error in self.publish_errors:
            log(f"publisher error: {error}")
        cpu = self._cpu_report("daemon", cpu0)  # py-spy, if attached, counts as "other"
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=30)
            log(f"py-spy profile of the daemon written to {self.profile}")
        result: dict[str, object] = {
            "msgs_per_s": self.messages / (finished - t0) if finished else None,
            "publish_msgs_per_s": self.messages / (pub_done - t0) if pub_done else None,
            "daemon_rss_mb": rss_peak / 1024,
            "cpu": cpu,
        }
        if finished:
            log(
                f"daemon: {self.messages} acknowledged in {finished - t0:.2f}s = "
                f"{result['msgs_per_s']:,.0f} msg/s, peak RSS {rss_peak / 1024:.0f} MB"
            )
        return result

    def stop_daemon(self) -> None:
        """SIGTERM: the daemon flushes what it holds (nothing, after a complete run)."""
        assert self.daemon is not None
        code = self.daemon.stop(timeout=60)
        if code != 0:
            raise BenchError(f"daemon exit code {code}:\n{self._daemon_log()}")

    # -- phase 3 (--backlog): the daemon alone --
    def backlog_run(self, extra_env: dict[str, str]) -> dict[str, object]:
        """The daemon's own drain rate: publish N while it is stopped (its persistent
        session queues them), then start it and time batches 10%..90% of the backlog —
        no publishers competing for the CPU. Diagnostic only: not the headline figure."""
        self.stop_daemon()
        before = self.stored_keys()
        _t0, published_at = self.publish_all()
        while published_at() is None:
            time.sleep(0.1)
        log(f"backlog: {self.messages} messages queued for the stopped daemon's session")
        port = self.start_daemon(extra_env)
        assert self.daemon is not None
        marks = [0.1 * self.messages, 0.9 * self.messages]
        snapshots: list[tuple[float, float, dict[str, float]]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(snapshots) < len(marks):
            acked = _acked(port)
            while len(snapshots) < len(marks) and acked >= marks[len(snapshots)]:
                snapshots.append((time.monotonic(), acked, self._cpu_snapshot()))
            if time.monotonic() > deadline:
                raise BenchError(f"backlog: only {acked:.0f} of {self.messages} acknowledged")
            time.sleep(0.02)
        while _acked(port) < self.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        (t10, a10, cpu10), (t90, a90, _cpu90) = snapshots
        if t90 <= t10:
            raise BenchError("backlog: too few batches to time; use more --messages")
        rate = (a90 - a10) / (t90 - t10)
        cpu = self._cpu_report("backlog", cpu10)
        rss_mb = _rss_kb(self.daemon.pid, "VmHWM") / 1024
        log(f"backlog: drained at {rate:,.0f} msg/s, peak RSS {rss_mb:.0f} MB")
        checked = self.verify(skip=before)
        return {"msgs_per_s": rate, "lost": checked["lost"], "cpu": cpu, "rss_mb": rss_mb}

    def _start_profiler(self) -> subprocess.Popen[bytes] | None:
        """``--profile``: sample the daemon with py-spy (collapsed stacks) while it runs."""
        if self.profile is None:
            return None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        assert self.daemon is not None
        argv = [py_spy, "record", "--pid", str(self.daemon.pid), "--format", "raw"]
        argv += ["--output", str(self.profile), "--rate", "250", "--threads", "--nonblocking"]
        proc = self.children.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        return proc

    def _cpu_snapshot(self) -> dict[str, float]:
        assert self.broker is not None and self.broker.process is not None
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall": time.monotonic(),
            "broker": _cpu_s(self.broker.process.pid),
            "clients": _children_cpu_s(),
            "daemon": _cpu_s(self.daemon.pid) if self.daemon is not None else 0.0,
            "bench": own.ru_utime + own.ru_stime,
            "busy": _system_busy_s(),
        }

    def _cpu_report(self, phase: str, before: dict[str, float]) -> dict[str, int]:
        """Where the 2 cores went during a phase, in % of one core; ``other`` is everything
        on the machine that is not this benchmark's (other jobs)."""
        after = self._cpu_snapshot()
        used = {name: after[name] - before[name] for name in after}
        wall = used.pop("wall")
        busy = used.pop("busy")
        used["other"] = max(0.0, busy - sum(used.values()))
        pct = {name: round(100 * seconds / wall) for name, seconds in used.items()}
        log(
            f"{phase}: CPU over {wall:.2f}s, % of one core: "
            + ", ".join(f"{name} {value}%" for name, value in pct.items())
        )
        return pct

    def _stalled(self, what: str) -> str:
        assert self.broker is not None
        errors = "\n".join(self.publish_errors) or "none reported"
        return (
            f"{what}: no progress for {STALL_S:.0f}s after the publishers finished "
            f"(publisher errors: {errors}); broker log:\n{log_tail(self.broker.log_path, 15)}"
        )

    def _daemon_log(self) -> str:
        return log_tail(self.root / "ingest.log", 40)

    # -- verification --
    def stored_keys(self) -> set[str]:
        return {info.key for info in LocalDirectoryStore(self.root / "objects").list(KEY_ROOT)}

    def verify(self, skip: set[str] | None = None) -> dict[str, float]:
        """Read every stored batch (but those in ``skip``) back; count ids, bytes, losses."""
        store = LocalDirectoryStore(self.root / "objects")
        seen: set[tuple[str, int]] = set()
        rows = 0
        parquet_bytes = 0
        for info in store.list(KEY_ROOT):
            if skip and info.key in skip:
                continue
            parquet_bytes += info.size
            table = read_batch(store.get(info.key)).table
            for topic, payload in zip(
                table.column("topic").to_pylist(),
                table.column("payload").to_pylist(),
                strict=True,
            ):
                if not topic.endswith("/telemetry"):
                    continue
                rows += 1
                body = json.loads(payload)
                seen.add((body["device_id"], body["seq"]))
        expected = sum(self.counts.values())
        lost = sum(1 for d, n in self.counts.items() for seq in range(n) if (d, seq) not in seen)
        log(
            f"verify: {rows} telemetry rows stored, {len(seen)} distinct, {lost} lost, "
            f"{rows - len(seen)} duplicates, {parquet_bytes:,} Parquet bytes"
        )
        assert len(seen) + lost == expected
        spooled = sum(1 for _ in (self.root / "spool").rglob("*.parquet"))
        if spooled:
            log(f"verify: {spooled} batches still in the spool (not counted above)")
        return {
            "lost": lost,
            "spooled": spooled,
            "duplicates": rows - len(seen),
            "parquet_bytes_per_msg": parquet_bytes / self.messages,
            "json_bytes_per_msg": self.json_bytes / self.messages,
        }

    def close(self) -> None:
        self.children.stop_all()
        if self.daemon is not None:
            self.daemon.stop(timeout=30)
        if self.broker is not None:
            self.broker.stop()


def _get(port: int, path: str) -> bytes:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        return exc.read()


def _health(port: int) -> dict:
    try:
        return json.loads(_get(port, "/healthz"))
    except (OSError, ValueError):
        return {}


_ACKED = re.compile(rb"^ingest_messages_acknowledged_total ([0-9.e+]+)$", re.MULTILINE)


def _acked(port: int) -> float:
    match = _ACKED.search(_get(port, "/metrics"))
    return float(match[1]) if match else 0.0


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _system_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of the children reaped so far (the MQTT client processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rss_kb(pid: int | None, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=1000, help="mosquitto_pub -M")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="also time the daemon draining a queued backlog alone (diagnostic)",
    )
    parser.add_argument(
        "--profile", type=Path, help="record the daemon with py-spy into this collapsed-stack file"
    )
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra INGEST_* setting for the daemon (repeatable)",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.daemon_env)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    root = Path(tempfile.mkdtemp(prefix="iot-bench-ingest-"))
    bench = Bench(root, args.messages, args.publishers, args.inflight)
    bench.profile = args.profile.resolve() if args.profile else None
    load_before = os.getloadavg()
    try:
        bench.setup()
        ceiling, ceiling_pub, ceiling_cpu = bench.ceiling()
        run = bench.daemon_run(extra_env)
        checked = bench.verify()  # while the daemon still runs: acked means durable
        backlog = bench.backlog_run(extra_env) if args.backlog else None
        bench.stop_daemon()
    except (BenchError, ServiceError) as exc:
        log(f"FAILED: {exc}")
        print(json.dumps({"error": str(exc).splitlines()[0], "messages": args.messages}))
        return 1
    finally:
        bench.close()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    rate = run["msgs_per_s"]
    result = {
        "msgs_per_s": round(rate) if rate else None,
        "ceiling_msgs_per_s": round(ceiling),
        "ratio": round(rate / ceiling, 3) if rate else None,
        "lost": checked["lost"],
        "daemon_rss_mb": round(run["daemon_rss_mb"], 1),
        "parquet_bytes_per_msg": round(checked["parquet_bytes_per_msg"], 1),
        "json_bytes_per_msg": round(checked["json_bytes_per_msg"], 1),
        "messages": args.messages,
        "parquet_to_json": round(
            checked["parquet_bytes_per_msg"] / checked["json_bytes_per_msg"], 3
        ),
        "duplicates": checked["duplicates"],
        "spooled_batches": checked["spooled"],
        "publishers": args.publishers,
        "publish_msgs_per_s": {
            "ceiling": round(ceiling_pub),
            "daemon": round(run["publish_msgs_per_s"] or 0),
        },
        # % of one core during each phase; "other" is the rest of the machine (other jobs)
        "cpu_pct": {"ceiling": ceiling_cpu, "daemon": run["cpu"]},
        "backlog": (
            None
            if backlog is None
            else {
                "msgs_per_s": round(backlog["msgs_per_s"]),
                "lost": backlog["lost"],
                "daemon_rss_mb": round(backlog["rss_mb"], 1),
                "cpu_pct": backlog["cpu"],
            }
        ),
        "loadavg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result), flush=True)
    return 0 if rate and checked["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
