"""Three ingest hosts on one shared subscription, one cut off, one killed: nothing is lost.

Each ingest daemon runs in a network namespace of its own (its own address and link, made
and removed by this test) on a private bridge with the broker; nothing listens beyond that
bridge and loopback. Under a steady stream of QoS 1 telemetry, host 1's link goes down for
60 s and comes back, and host 3's daemon is killed with SIGKILL and started again with the
same identity (what a StatefulSet does). Then every raw batch is loaded into a real
PostgreSQL as the pipeline does, and:

    published (PUBACKed by the broker) == loaded (telemetry rows) == distinct raw messages

What makes it so is the broker's redelivery of unacknowledged messages to the same
persistent session when a host returns, and the warehouse's idempotence for the
duplicates that redelivery creates (counted and printed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pyarrow as pa
import pytest

from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.pki import CertificateAuthority, init_pki
from iot_platform.services.mosquitto import INGEST_IDENTITY, BrokerConfig, mosquitto_binary
from iot_platform.services.process import ChildProcess, ServiceError, free_port
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from iot_platform.warehouse.migrations import migrate
from tests.fixtures.ingest import ingest_env, local_store_env, stored_rows
from tests.mqtt_helpers import device_session

IP = shutil.which("ip") or "/usr/sbin/ip"
HOSTS = 3
DEVICES = [f"netns-dev-{i}" for i in range(4)]
RATE_PER_DEVICE = 40  # messages/s: 160/s in all
CUT_S = 60.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.long,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not Path(IP).exists(), reason="no `ip` (iproute2) to make namespaces"),
]


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    """A bridge in this namespace (the broker's side) and one namespace per ingest host."""

    bridge: str
    subnet: ipaddress.IPv4Network
    namespaces: list[str] = field(default_factory=list)

    @property
    def broker_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def host_ip(self, index: int) -> str:
        return str(self.subnet.network_address + 10 + index)

    def link(self, index: int, up: bool) -> None:
        ip("-n", self.namespaces[index], "link", "set", "eth0", "up" if up else "down")


def free_subnet() -> ipaddress.IPv4Network:
    routes = subprocess.run([IP, "-4", "route"], capture_output=True, text=True).stdout
    used = [
        ipaddress.ip_network(r.split()[0], strict=False)
        for r in routes.splitlines()
        if r and r.split()[0][0].isdigit()
    ]
    for third in secrets.SystemRandom().sample(range(256), 256):
        candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise AssertionError("no free 10.213.x.0/24 for the test network")


@pytest.fixture
def network() -> Iterator[Network]:
    tag = secrets.token_hex(3)
    net = Network(bridge=f"iotbr{tag}", subnet=free_subnet())
    try:
        ip("link", "add", net.bridge, "type", "bridge")
        ip("addr", "add", f"{net.broker_ip}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i in range(HOSTS):
            ns, veth = f"iot-ingest-{tag}-{i}", f"iv{tag}{i}"
            ip("netns", "add", ns)
            net.namespaces.append(ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", net.bridge, "up")
            ip("-n", ns, "addr", "add", f"{net.host_ip(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield net
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    finally:
        for ns in net.namespaces:  # their veth ends go with them
            subprocess.run([IP, "netns", "del", ns], capture_output=True)
        subprocess.run([IP, "link", "del", net.bridge], capture_output=True)


@dataclass
class Host:
    """One ingest daemon inside its host's namespace; restartable with the same identity."""

    net: Network
    index: int
    env: dict[str, str]
    log_path: Path
    metrics_port: int = 9108
    process: ChildProcess | None = None

    def start(self) -> Host:
        ns = self.net.namespaces[self.index]
        self.process = ChildProcess(
            f"ingest-host-{self.index}",
            [IP, "netns", "exec", ns, sys.executable, "-m", "ingest_daemon"],
            self.log_path,
            env={**self.env, "INGEST_METRICS_PORT": str(self.metrics_port)},
        ).start()
        self.process.wait_until(
            lambda: self.health().get("connected"), timeout=30, what="connected"
        )
        return self

    def health(self) -> dict:
        url = f"http://{self.net.host_ip(self.index)}:{self.metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except OSError:
            return {}

    def kill9(self) -> None:
        assert self.process is not None and self.process.proc is not None
        os.kill(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(timeout=10)


def distinct_messages(rows: pa.Table) -> set[tuple[str, bytes]]:
    return set(zip(rows["topic"].to_pylist(), rows["payload"].to_pylist(), strict=True))


def publish_steadily(broker, device_id: str, stop: threading.Event, sent: list[int]) -> None:
    """QoS 1 envelopes with seq 0, 1, 2 ... at RATE_PER_DEVICE until ``stop``; ``sent``
    gets the seqs the broker acknowledged (PUBACK reason code 0)."""
    session = device_session(broker, device_id, max_inflight=200)
    assert session.connected.is_set(), session.reason
    mids: dict[int, int] = {}
    seq, start = 0, time.monotonic()
    while not stop.is_set():
        ts = dt.datetime.now(dt.UTC)
        payload = json.dumps(
            {
                "v": 2,
                "device_id": device_id,
                "ts": ts.isoformat(),
                "seq": seq,
                "msg_type": "telemetry",
                "measurements": [{"type": "voltage_dc", "val": 700 + seq % 50, "unit": "V"}],
            }
        )
        info = session.client.publish(f"iot/{device_id}/telemetry", payload, qos=1)
        mids[info.mid] = seq
        seq += 1
        time.sleep(max(0.0, start + seq / RATE_PER_DEVICE - time.monotonic()))
    deadline = time.monotonic() + 60
    while len(session.puback_codes) < len(mids) and time.monotonic() < deadline:
        time.sleep(0.1)
    sent.extend(mids[mid] for mid, code in session.puback_codes.items() if code == 0)
    session.close()


def test_three_hosts_one_cut_off_one_killed_lose_nothing(network, tmp_path, postgres_db):
    ca = CertificateAuthority(tmp_path / "certs", secrets.token_urlsafe(16))
    init_pki(ca, broker_hosts=[network.broker_ip], services=[INGEST_IDENTITY], crl_days=7)
    for device in DEVICES:
        ca.issue_device_certificate(device)
    port = free_port(network.broker_ip)
    config = BrokerConfig(
        port=port,
        certs_dir=ca.certs_dir,
        config_dir=tmp_path / "broker",
        data_dir=tmp_path / "broker-data",
        bind_address=network.broker_ip,
    )
    broker_process = ChildProcess(
        "mosquitto", [mosquitto_binary(), "-c", str(config.write())], tmp_path / "mosquitto.log"
    ).start()
    broker = SimpleNamespace(host=network.broker_ip, port=port, ca=ca)
    store_dir = tmp_path / "objects"
    hosts: list[Host] = []
    try:
        broker_process.wait_for_port(network.broker_ip, port)
        for i in range(HOSTS):
            env = ingest_env(
                broker,
                tmp_path / f"spool-{i}",
                **local_store_env(store_dir),
                INGEST_INSTANCE_ID=f"host-{i}",
                INGEST_SHARE_GROUP="ingest",  # one group: the three split the stream
                INGEST_METRICS_HOST="0.0.0.0",  # noqa: S104 (inside the host's namespace)
                INGEST_KEEPALIVE_S="5",
            )
            hosts.append(Host(network, i, env, tmp_path / f"ingest-{i}.log").start())

        stop, sent = threading.Event(), {d: [] for d in DEVICES}
        publishers = [
            threading.Thread(target=publish_steadily, args=(broker, d, stop, sent[d]))
            for d in DEVICES
        ]
        started = time.monotonic()
        for thread in publishers:
            thread.start()
        time.sleep(10)
        network.link(0, up=False)  # host 0 cut off
        time.sleep(15)
        hosts[2].kill9()  # host 2's daemon dies mid-stream...
        time.sleep(10)
        hosts[2].start()  # ...and comes back with the same identity and spool
        time.sleep(CUT_S - 25)
        network.link(0, up=True)
        time.sleep(15)
        stop.set()
        elapsed = time.monotonic() - started
        for thread in publishers:
            thread.join(timeout=120)
        published = sum(len(seqs) for seqs in sent.values())
        assert published > 0.8 * len(DEVICES) * RATE_PER_DEVICE * elapsed, "a steady stream"

        store = LocalDirectoryStore(store_dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # host 0 reconnects; redeliveries land
            if len(distinct_messages(stored_rows(store))) >= published and all(
                h.health().get("connected") for h in hosts
            ):
                break
            time.sleep(1)
        for host in hosts:
            assert host.process is not None
            assert host.process.stop(timeout=60) == 0, host.log_path.read_text()[-2000:]

        rows = stored_rows(store)  # this test's broker carried only this test's devices
        distinct = len(distinct_messages(rows))
        with psycopg.connect(postgres_db) as conn:
            migrate(conn)
            conn.execute("INSERT INTO devices (device_id) SELECT unnest(%s::text[])", [DEVICES])
            conn.commit()
            for info in sorted(store.list("raw/v1/"), key=lambda i: i.key):
                load_object(
                    conn,
                    store,
                    info,
                    run_id="netns",
                    parameters=load_parameters(conn),
                    devices=known_devices(conn),
                    max_payload_bytes=262144,
                )
            loaded = conn.execute(
                "SELECT count(*) FROM telemetry WHERE device_id = ANY(%s)", [DEVICES]
            ).fetchone()[0]
        duplicates = rows.num_rows - distinct
        print(
            f"published {published}, raw rows {rows.num_rows} ({duplicates} redelivered "
            f"duplicates), distinct {distinct}, loaded {loaded}"
        )
        assert published == distinct == loaded
        per_host = {h.env["INGEST_INSTANCE_ID"]: 0 for h in hosts}
        for info in store.list("raw/v1/"):
            for instance in per_host:
                if f"-{instance}-" in info.key:
                    per_host[instance] += 1
        assert all(per_host.values()), f"every host wrote batches: {per_host}"
    except ServiceError as exc:
        pytest.fail(f"a service did not start: {exc}", pytrace=False)
    finally:
        for host in hosts:
            if host.process is not None and host.process.running():
                host.process.stop(timeout=10)
        broker_process.stop()
