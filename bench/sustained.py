"""Sustained load through the whole embedded stack: publish -> queryable, per row.

Starts ``iot-platform up`` as ``scripts/up.sh`` does (default settings, a temporary home,
free ports), registers N devices with real certificates, and publishes v2 telemetry
(5 measurements a message) over mTLS at a fixed total rate through one ``mosquitto_pub
-l`` process per device (QoS 1; a connection is replaced before 60,000 messages, since
Mosquitto 2.0.11 drops a ``mosquitto_pub -l`` connection after 65,535 QoS 1 messages).

Publish -> queryable is computed per row from the warehouse: the payload ``ts`` (stamped
when the line is written to the publisher) against ``ingest_batches.loaded_at`` (when the
batch's rows were written, just before its commit). While publishing, the Dagster
GraphQL API is polled every second for load runs that are queued or running, per hour
partition. CPU seconds are read from /proc per component of the stack, plus the
publishers, this script's line writer and the optional busy loops.

    .venv/bin/python bench/sustained.py --rate 10000 --duration 600
    .venv/bin/python bench/sustained.py --rate 2000 --duration 300 --busy 2
    .venv/bin/python bench/sustained.py --find-max --rate 2000 --step 2000 --duration 120

``--bindir`` runs the warehouse on other PostgreSQL server binaries (IOT_PG_BINDIR), e.g.
a TimescaleDB build.

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded import EmbeddedStack

MEASUREMENTS = (
    ("voltage_dc", "V", 750.0),
    ("current_dc", "A", 20.0),
    ("power_dc", "W", 15000.0),
    ("energy_dc", "kWh", 1200.0),
    ("temperature", "C", 35.0),
)
PER_CONNECTION = 60_000  # < 65,535: see the module docstring
IN_FLIGHT = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]
TICKS = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[sustained] {message}", file=sys.stderr, flush=True)


def _iso(epoch_us: int) -> str:
    seconds, micros = divmod(epoch_us, 1_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{micros:06d}Z"


# ---- publishers ---------------------------------------------------------------------------
class DevicePublisher:
    """One device: a ``mosquitto_pub -l`` process with the device's own certificate."""

    def __init__(self, stack: EmbeddedStack, device_id: str) -> None:
        self.stack, self.device_id = stack, device_id
        self.cert, self.key = stack.ca.device_paths(device_id)
        self.topic = f"iot/{device_id}/telemetry"
        self.seq = 0
        self.sent = 0
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.on_connection = 0
        self.finished: list[subprocess.Popen[bytes]] = []

    def _open(self) -> None:
        self.generation += 1
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.stack.broker_port)]
        argv += ["--cafile", str(self.stack.ca.ca_cert_path), "--cert", str(self.cert)]
        argv += ["--key", str(self.key), "-i", f"{self.device_id}-pub{self.generation}"]
        argv += ["-t", self.topic, "-q", "1", "-M", "200", "-l"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.on_connection = 0

    def _retire(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # mosquitto_pub sends what it has, then disconnects
            self.finished.append(self.proc)
            self.proc = None

    def publish(self, count: int, at_us: int) -> None:
        """``count`` messages stamped ``at_us``, ``at_us + 1``, … (epoch microseconds):
        rows are unique on (device, metric, ts), so each message needs its own ts."""
        lines = []
        for k in range(count):
            self.seq += 1
            ts = _iso(at_us + k)
            body = ",".join(
                f'{{"type":"{m}","val":{v + (self.seq % 97) / 10},"unit":"{u}"}}'
                for m, u, v in MEASUREMENTS
            )
            lines.append(
                f'{{"v":2,"device_id":"{self.device_id}","ts":"{ts}","seq":{self.seq},'
                f'"msg_type":"telemetry","measurements":[{body}]}}\n'
            )
        while lines:
            if self.proc is None or self.on_connection >= PER_CONNECTION:
                self._retire()
                self._open()
            room = PER_CONNECTION - self.on_connection
            chunk, lines = lines[:room], lines[room:]
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write("".join(chunk).encode())
            self.proc.stdin.flush()
            self.on_connection += len(chunk)
            self.sent += len(chunk)

    def close(self, timeout: float = 120) -> list[str]:
        """Wait for every connection to finish; returns the failures (empty when clean)."""
        self._retire()
        errors = []
        for proc in self.finished:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            if code != 0:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                errors.append(f"{self.device_id}: mosquitto_pub exit {code}: {stderr[-300:]}")
        self.finished = []
        return errors


def publish_at_rate(publishers: list[DevicePublisher], rate: float, duration: float) -> int:
    """Write ``rate`` messages/s spread over the devices for ``duration`` seconds, in 20 ms
    slices; each message's ``ts`` is the moment its slice is written."""
    started = time.monotonic()
    sent = 0
    n = 0
    last_report = started
    while True:
        now = time.monotonic()
        elapsed = now - started
        if elapsed >= duration:
            break
        due = int(rate * elapsed) - sent
        if due > 0:
            at_us = time.time_ns() // 1000
            share, extra = divmod(due, len(publishers))
            for i in range(len(publishers)):
                count = share + (1 if i < extra else 0)
                if count:
                    publishers[(n + i) % len(publishers)].publish(count, at_us)
            n += extra
            sent += due
        if now - last_report >= 30:
            last_report = now
            progress(f"  {elapsed:.0f}s: {sent} messages written ({sent / elapsed:.0f}/s)")
        time.sleep(0.02)
    return sent


# ---- observation ----------------------------------------------------------------------------
class RunMonitor(threading.Thread):
    """Polls Dagster for in-flight runs: the most per hour partition, and the most queued."""

    QUERY = """query($statuses: [RunStatus!]) {
      runsOrError(filter: {statuses: $statuses}) {
        ... on Runs { results { runId status tags { key value } } } } }"""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/graphql"
        self.max_per_partition = 0
        self.max_queued = 0
        self.errors = 0
        self._stop = threading.Event()

    def reset(self) -> None:
        self.max_per_partition = self.max_queued = 0

    def run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                response = requests.post(
                    self.url,
                    json={"query": self.QUERY, "variables": {"statuses": IN_FLIGHT}},
                    timeout=10,
                )
                runs = response.json()["data"]["runsOrError"]["results"]
            except (requests.RequestException, KeyError, TypeError, ValueError):
                self.errors += 1
                continue
            per_partition: dict[str, int] = defaultdict(int)
            for run in runs:
                tags = {t["key"]: t["value"] for t in run["tags"]}
                if "dagster/partition" in tags:
                    per_partition[tags["dagster/partition"]] += 1
            queued = sum(run["status"] == "QUEUED" for run in runs)
            self.max_per_partition = max(self.max_per_partition, *per_partition.values(), 0)
            self.max_queued = max(self.max_queued, queued)

    def stop(self) -> None:
        self._stop.set()


RUNS_QUERY = """query($job: String!, $after: Float!) {
  runsOrError(filter: {pipelineName: $job, createdAfter: $after}) {
    ... on Runs { results { runId creationTime startTime endTime
                           stepStats { stepKey startTime endTime } } } } }"""
EVENTS_QUERY = """query($runId: ID!) { logsForRun(runId: $runId) {
  ... on EventConnection { events { __typename ... on MessageEvent { timestamp } } } } }"""


def run_breakdown(url: str, after: float, sample: int = 20) -> dict:
    """Where a load run's seconds go, averaged over the last ``sample`` runs: in the queue
    (enqueued by the sensor -> the coordinator starts it: RUN_STARTING), launch (-> the
    run process has started Python, imported the code location and begins: RUN_START),
    init (-> the load step starts: resources, log capture), the load step, the three
    rollup steps, and the end."""

    def graphql(query: str, **variables: object) -> dict:
        response = requests.post(
            f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        return response.json()["data"]

    runs = graphql(RUNS_QUERY, job="load_raw_batches_job", after=after)["runsOrError"]
    runs = [r for r in runs["results"] if r["endTime"]][:sample]
    parts: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        events = graphql(EVENTS_QUERY, runId=run["runId"])["logsForRun"]["events"]
        at = {e["__typename"]: int(e["timestamp"]) / 1000 for e in events if e.get("timestamp")}
        steps = {s["stepKey"]: s for s in run["stepStats"] if s["endTime"]}
        load = steps.get("load_raw_batches")
        if not load or not {"RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent"} <= set(at):
            continue
        rollups = [s for k, s in steps.items() if k != "load_raw_batches"]
        parts["queue_s"].append(at["RunStartingEvent"] - at["RunEnqueuedEvent"])
        parts["launch_s"].append(at["RunStartEvent"] - at["RunStartingEvent"])
        parts["init_s"].append(load["startTime"] - at["RunStartEvent"])
        parts["load_s"].append(load["endTime"] - load["startTime"])
        parts["rollups_s"].append(sum(s["endTime"] - s["startTime"] for s in rollups))
        last = max([load["endTime"], *(s["endTime"] for s in rollups)])
        parts["finish_s"].append(run["endTime"] - last)
    summary = {k: round(sum(v) / len(v), 2) for k, v in parts.items()}
    return summary | {"runs": len(parts["load_s"])}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            tree[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return tree


def _stat_ticks(pid: int, fields: slice) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in stat[fields]) / TICKS


def _cpu_s(pid: int) -> float:
    """User + system seconds of a process and of the children it has reaped."""
    return _stat_ticks(pid, slice(11, 15))


def _component(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    for name in ("postgres", "mosquitto", "ingest_daemon", "dagster-webserver", "dagster-daemon"):
        if name in cmd:
            return name
    if "code-server" in cmd:  # the load runs are its children
        return "code servers + runs"
    return "other"


def stack_cpu(stack: EmbeddedStack) -> dict[str, float]:
    """CPU seconds per top-level child of ``up`` (its whole subtree, exited members included
    through their parents' reaped-children time)."""
    assert stack.proc is not None
    tree = _children()
    totals: dict[str, float] = defaultdict(float)
    totals["up"] = _stat_ticks(stack.proc.pid, slice(11, 13))  # the supervisor itself
    for child in tree.get(stack.proc.pid, []):
        todo, total = [child], 0.0
        while todo:
            pid = todo.pop()
            total += _cpu_s(pid)
            todo.extend(tree.get(pid, []))
        totals[_component(child)] += total
    return dict(totals)


def _self_and_children() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


# ---- one phase --------------------------------------------------------------------------------
def rows_loaded(conn: psycopg.Connection, since: dt.datetime) -> int:
    """Rows loaded since ``since``, from the ledger (the stack runs no other devices).
    Polled every second while the load drains: a count(*) over telemetry took 1.7 s at
    12 million rows and competed with the very load it waited for."""
    return conn.execute(
        "SELECT coalesce(sum(telemetry_rows), 0) FROM ingest_batches WHERE loaded_at >= %s",
        [since],
    ).fetchone()[0]


def phase(
    stack: EmbeddedStack,
    publishers: list[DevicePublisher],
    monitor: RunMonitor,
    *,
    rate: float,
    duration: float,
    busy: int,
    drain_timeout: float,
) -> dict:
    since = dt.datetime.now(dt.UTC)
    monitor.reset()
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    cpu_before = stack_cpu(stack)
    self_before, kids_before = _self_and_children()
    wall_started = time.monotonic()
    progress(f"publishing {rate:.0f} msgs/s x 5 measurements for {duration:.0f}s, busy={busy}")
    written = publish_at_rate(publishers, rate, duration)
    publish_s = time.monotonic() - wall_started
    failures = [e for p in publishers for e in p.close()]
    published = written * len(MEASUREMENTS)
    self_after, kids_after = _self_and_children()

    progress(f"published {written} messages; waiting for the load to drain")
    stopped = time.monotonic()
    drained_s = None
    with psycopg.connect(stack.conninfo, autocommit=True) as conn:
        while time.monotonic() - stopped < drain_timeout:
            loaded = rows_loaded(conn, since)
            if loaded >= published:
                drained_s = round(time.monotonic() - stopped, 1)
                break
            time.sleep(1)
        cpu_after = stack_cpu(stack)
        wall = time.monotonic() - wall_started
        for loop in loops:
            loop.kill()
            loop.wait()
        # One pass over the run's rows: the whole run (hour NULL) and each hour apart, to
        # show what an hour boundary costs the new hour's first minute.
        rows = conn.execute(
            """SELECT hour, count(*), count(DISTINCT (device_id, metric, ts)),
                      percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY d),
                      max(d), max(d) FILTER (WHERE ts < hour + interval '1 minute'),
                      count(DISTINCT dagster_run_id)
               FROM (SELECT t.device_id, t.metric, t.ts, b.dagster_run_id,
                            date_trunc('hour', t.ts) AS hour,
                            extract(epoch FROM b.loaded_at - t.ts)::float8 AS d
                     FROM telemetry t JOIN ingest_batches b USING (batch_id)
                     WHERE t.device_id LIKE 'sus-%%' AND t.ts >= %s) x
               GROUP BY ROLLUP (hour) ORDER BY hour NULLS FIRST""",
            [since],
        ).fetchall()
        # The shape of the lag over the run, cheaply from the ledger: per minute of device
        # time, the largest lag of any batch's oldest row (a steady climb, a step that
        # never drains, or one stall; the per-row query above, grouped by minute too, took
        # minutes at 30 million rows).
        by_minute = conn.execute(
            """SELECT date_trunc('minute', min_ts) AS minute,
                      max(extract(epoch FROM loaded_at - min_ts))::float8
               FROM ingest_batches WHERE loaded_at >= %s AND min_ts >= %s
               GROUP BY 1 ORDER BY 1""",
            [since, since],
        ).fetchall()
    whole, hours = rows[0], rows[1:]
    per_hour = {
        hour.strftime("%H:00"): {
            "rows": count,
            "p95_s": _round(percentiles[1]),
            "max_s": _round(hour_max),
            "first_minute_max_s": _round(first_minute_max),
        }
        for hour, count, _, percentiles, hour_max, first_minute_max, _ in hours
    }
    _, loaded, distinct, percentiles, worst, _, runs = whole
    p50, p95, p99 = percentiles or (None,) * 3
    cpu = {k: round(cpu_after.get(k, 0) - cpu_before.get(k, 0), 1) for k in cpu_after}
    cpu["publishers"] = round(kids_after - kids_before, 1)
    cpu["bench_writer"] = round(self_after - self_before, 1)
    capacity = wall * (os.cpu_count() or 1)
    return {
        "rate_msgs_s": rate,
        "achieved_msgs_s": round(written / publish_s, 1),
        "duration_s": duration,
        "busy_loops": busy,
        "published_rows": published,
        "loaded_rows": loaded,
        "distinct_rows": distinct,
        "p50_s": _round(p50),
        "p95_s": _round(p95),
        "p99_s": _round(p99),
        "max_s": _round(worst),
        "per_hour": per_hour,
        "max_lag_by_minute_s": [_round(lag) for _, lag in by_minute],
        "drain_s": drained_s,
        "max_in_flight_runs_per_partition": monitor.max_per_partition,
        "max_queued_runs": monitor.max_queued,
        "runs_launched": runs,
        "cpu_s": cpu,
        "cpu_share": {k: round(v / capacity, 3) for k, v in cpu.items()},
        "run_breakdown_s": run_breakdown(stack.dagster_url, since.timestamp()),
        "publisher_failures": failures[:5],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def sustained(result: dict) -> bool:
    return (
        result["p95_s"] is not None
        and result["p95_s"] <= 30
        and result["drain_s"] is not None
        and result["max_in_flight_runs_per_partition"] <= 1
        and result["loaded_rows"] == result["published_rows"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10_000, help="messages/s in total")
    parser.add_argument("--duration", type=float, default=600, help="seconds of publishing")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes meanwhile")
    parser.add_argument("--drain-timeout", type=float, default=300)
    parser.add_argument("--find-max", action="store_true", help="step the rate up")
    parser.add_argument("--step", type=float, default=2000, help="rate step for --find-max")
    parser.add_argument("--keep-home", action="store_true", help="keep logs and state")
    parser.add_argument("--bindir", type=Path, default=None, help="PostgreSQL server binaries")
    args = parser.parse_args()

    stack = EmbeddedStack("sustained", bindir=args.bindir)
    monitor = RunMonitor(stack.dagster_url)
    try:
        progress("starting the embedded stack")
        stack.start()
        device_ids = [f"sus-{n:04d}" for n in range(args.devices)]
        stack.register_devices(device_ids)
        publishers = [DevicePublisher(stack, d) for d in device_ids]
        monitor.start()
        if not args.find_max:
            result = phase(
                stack,
                publishers,
                monitor,
                rate=args.rate,
                duration=args.duration,
                busy=args.busy,
                drain_timeout=args.drain_timeout,
            )
            print(json.dumps(result | {"dialect": stack.dialect()}))
            return 0
        steps, rate, best = [], args.rate, None
        while True:
            result = phase(
                stack,
                publishers,
                monitor,
                rate=rate,
                duration=args.duration,
                busy=args.busy,
                drain_timeout=args.drain_timeout,
            )
            progress(json.dumps(result))
            steps.append(result)
            if not sustained(result):
                break
            best = rate
            rate += args.step
        print(
            json.dumps({"max_sustained_msgs_s": best, "steps": steps, "dialect": stack.dialect()})
        )
        return 0
    finally:
        monitor.stop()
        stack.stop(keep_home=args.keep_home)


if __name__ == "__main__":
    sys.exit(main())
