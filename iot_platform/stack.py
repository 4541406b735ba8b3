"""The embedded stack: every service as a child of one supervisor process (`iot-platform up`).

State lives under ``IOT_HOME`` (default ``.iot/``): PostgreSQL data, broker config and
persistence, Dagster home, logs and generated local secrets. A second start reuses it.
A child that exits is restarted (at most MAX_RESTARTS times per RESTART_WINDOW_S; a
crash loop stops everything). Ctrl-C or SIGTERM stops the children in reverse start
order, each by its PID.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psycopg
import yaml  # type: ignore[import-untyped]  # PyYAML (a dependency of dagster) ships no stubs

from ingest_daemon.config import DEFAULT_METRICS_PORT
from iot_platform.broker_control import INGEST_IDENTITY
from iot_platform.crl_http import listen_port
from iot_platform.pki import CertificateAuthority, init_pki
from iot_platform.services.mosquitto import BrokerConfig, MosquittoBroker
from iot_platform.services.postgres import PostgresServer
from iot_platform.services.process import ChildProcess, ServiceError, free_port, port_is_open
from iot_platform.settings import (
    PROJECT_ROOT,
    PlatformSettings,
    Secret,
    SettingsError,
    env_int,
    env_secret,
)
from iot_platform.warehouse.migrations import Dialect, migrate

log = logging.getLogger(__name__)

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
BINDIR = Path(sys.executable).parent
SERVICE_IDENTITIES = [INGEST_IDENTITY]


def local_secret(settings: PlatformSettings, env_name: str, filename: str) -> Secret:
    """The secret from env/``*_FILE`` if given, else one generated once under ``IOT_HOME``.

    Generated secrets are 0600 files in ``.iot/secrets`` (git-ignored), so the embedded
    stack needs no configuration and no secret is ever committed.
    """
    given = env_secret(env_name)
    if given is not None:
        return given
    path = settings.home / "secrets" / filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return Secret(path.read_text().strip())


def warehouse_conninfo(settings: PlatformSettings) -> str:
    """The warehouse's conninfo; the password from env/``_FILE`` or the embedded stack's."""
    password = env_secret("IOT_PG_PASSWORD")
    generated = settings.home / "secrets" / "pg_password"
    if password is None and generated.exists():
        password = Secret(generated.read_text().strip())
    if password is None:
        raise SettingsError("set IOT_PG_PASSWORD or IOT_PG_PASSWORD_FILE")
    return psycopg.conninfo.make_conninfo(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=password.value,
        dbname=settings.pg_database,
        connect_timeout=10,
    )


def certificate_authority(settings: PlatformSettings) -> CertificateAuthority:
    passphrase = local_secret(settings, "IOT_CA_PASSPHRASE", "ca_passphrase")
    return CertificateAuthority(settings.certs_dir, passphrase.value, crl_url=settings.crl_url)


def broker_config(settings: PlatformSettings) -> BrokerConfig:
    broker_home = settings.home / "mosquitto"
    return BrokerConfig(
        port=settings.broker_port,
        certs_dir=settings.certs_dir,
        config_dir=broker_home / "config",
        data_dir=broker_home / "data",
        bind_address=settings.broker_host,
        max_inflight=settings.broker_max_inflight,
        max_queued=settings.broker_max_queued,
        message_size_limit=settings.mqtt_max_payload_bytes,
    )


def prepare_pki(settings: PlatformSettings) -> list[str]:
    hosts = ["localhost", "127.0.0.1", settings.broker_service_name]
    if settings.broker_host not in hosts:
        hosts.append(settings.broker_host)
    return init_pki(
        certificate_authority(settings),
        broker_hosts=hosts,
        services=SERVICE_IDENTITIES,
        crl_days=settings.crl_days,
    )


@dataclass(frozen=True)
class CodeLocation:
    """A code location of ``workspace.yaml`` served on a loopback port of its own."""

    name: str
    module: str
    port: int


def code_locations(workspace: Path) -> list[CodeLocation]:
    """The ``python_module`` locations of ``workspace``, each given a free loopback port.

    The embedded stack serves each with ``dagster code-server start`` and points the
    webserver and the daemon at those servers (``workspace_of``), as docker compose does.
    Left to load ``workspace.yaml`` themselves, the webserver and the daemon each started
    their own code servers, and the daemon started fresh ones every 60 s to pick up code
    changes: importing both locations again (the dbt one alone takes 3-4 s of CPU) on a
    machine the live load already keeps busy.
    """
    entries = yaml.safe_load(workspace.read_text())["load_from"]
    return [
        CodeLocation(
            entry["python_module"]["location_name"],
            entry["python_module"]["module_name"],
            free_port(),
        )
        for entry in entries
    ]


def workspace_of(locations: list[CodeLocation]) -> dict:
    """A workspace that reaches each location over gRPC on loopback."""
    return {
        "load_from": [
            {"grpc_server": {"host": "127.0.0.1", "port": loc.port, "location_name": loc.name}}
            for loc in locations
        ]
    }


MAX_RESTARTS = 5
RESTART_WINDOW_S = 600


@dataclass
class Supervised:
    """A child and how to start it again: a crash is restarted; a crash loop of an
    essential child stops the stack, of an optional one (the simulator) only drops it."""

    name: str
    process: ChildProcess
    start: Callable[[], ChildProcess | None]
    essential: bool = True
    # A client of the services (Dagster, the simulator): no other child needs it to stop
    # cleanly, so the clients stop together, before the services.
    client: bool = False
    restarts: deque[float] = field(default_factory=deque)

    def may_restart(self, now: float) -> bool:
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        return len(self.restarts) < MAX_RESTARTS

    def restart(self) -> None:
        self.restarts.append(time.monotonic())
        self.process.stop()  # reap it and whatever it left in its process group
        process = self.start()
        assert process is not None, f"{self.name} did not start"
        self.process = process


def supervise(children: list[Supervised], stopping: Callable[[], bool], poll_s: float = 0.5) -> int:
    """Restart children that exit until ``stopping()``; 1 if an essential one crash-loops."""
    while not stopping():
        for child in list(children):
            if child.process.running() or stopping():
                continue
            if not child.may_restart(time.monotonic()):
                crash_loop = f"{child.name} exited {MAX_RESTARTS + 1} times in "
                crash_loop += f"{RESTART_WINDOW_S} s; see {child.process.log_path}"
                if child.essential:
                    log.error("%s; stopping", crash_loop)
                    return 1
                log.error("%s; the platform goes on without it", crash_loop)
                child.process.stop()
                children.remove(child)
                continue
            log.warning("%s exited unexpectedly; restarting it", child.name)
            try:
                child.restart()
            except ServiceError as exc:  # counted; tried again on a later poll
                log.error("%s could not be restarted: %s", child.name, exc)
        time.sleep(poll_s)
    return 0


class EmbeddedStack:
    """Starts, watches (restarting what crashes) and stops the embedded services."""

    def __init__(self, settings: PlatformSettings) -> None:
        self.settings = settings
        self.logs = settings.home / "logs"
        self.pg_password = local_secret(settings, "IOT_PG_PASSWORD", "pg_password")
        self.postgres = PostgresServer(
            settings.home / "postgres",
            port=settings.pg_port,
            password=self.pg_password.value,
            user=settings.pg_user,
            host=settings.pg_host,
            dialect=settings.warehouse_dialect,
        )
        self.warehouse_dialect = "not migrated yet"
        self.broker = MosquittoBroker(broker_config(settings), log_path=self.logs / "mosquitto.log")
        self.ingest_metrics_port = env_int("INGEST_METRICS_PORT", DEFAULT_METRICS_PORT, minimum=1)
        self.children: list[Supervised] = []
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------
    def check_ports(self) -> None:
        s = self.settings
        for name, host, port in (
            ("IOT_PG_PORT", s.pg_host, s.pg_port),
            ("IOT_BROKER_PORT", s.broker_host, s.broker_port),
            ("IOT_DAGSTER_PORT", s.dagster_host, s.dagster_port),
            ("INGEST_METRICS_PORT", "127.0.0.1", self.ingest_metrics_port),
            *((("IOT_CRL_URL", "127.0.0.1", self.crl_port),) if s.crl_url else ()),
        ):
            if port_is_open(host, port):
                raise ServiceError(
                    f"{host}:{port} is already in use: stop that process or set {name}"
                )

    def start(self) -> None:
        self.check_ports()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        created = prepare_pki(self.settings)
        if created:
            log.info("PKI: created %s in %s", ", ".join(created), self.settings.certs_dir)
        self._supervise("postgres", lambda: self.postgres.start().process)
        for database in (self.settings.pg_database, self.settings.dagster_database):
            if self.postgres.ensure_database(database):
                log.info("created database %s", database)
        with psycopg.connect(self.postgres.conninfo(self.settings.pg_database)) as conn:
            dialect, applied = migrate(conn, self.settings.warehouse_dialect)
            self.warehouse_dialect = _describe_dialect(conn, dialect)
        log.info("warehouse (%s): %s", dialect.value, ", ".join(applied) or "schema up to date")
        self._supervise("mosquitto", lambda: self.broker.start().process)
        if self.settings.crl_url:  # Mosquitto reads crl.pem; the URL is for other parties
            self._supervise("crl", self._start_crl, essential=False)
        self._supervise("ingest", self._start_ingest)
        self._end_unfinished_runs()
        for location in self._code_locations:
            start = functools.partial(self._start_code_server, location)
            self._supervise(f"code-{location.name}", start, client=True)
        self._supervise("dagster-webserver", self._start_webserver, client=True)
        self._supervise("dagster-daemon", self._start_daemon, client=True)
        if self.settings.simulator_devices:
            self._supervise("simulator", self._start_simulator, essential=False, client=True)

    def _supervise(
        self,
        name: str,
        start: Callable[[], ChildProcess | None],
        *,
        essential: bool = True,
        client: bool = False,
    ) -> None:
        process = start()
        assert process is not None, f"{name} did not start"
        self.children.append(Supervised(name, process, start, essential, client))

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, signal_group: bool = False
    ) -> ChildProcess:
        return ChildProcess(
            name,
            argv,
            self.logs / f"{name}.log",
            env=env,
            cwd=PROJECT_ROOT,
            signal_group=signal_group,
            stop_timeout_s=5.0 if signal_group else 20.0,
        ).start()

    def _platform_env(self) -> dict[str, str]:
        """What every child needs to find the platform; secrets are added per child."""
        s = self.settings
        env = dict(os.environ)
        env.update(
            IOT_HOME=str(s.home),
            IOT_CERTS_DIR=str(s.certs_dir),
            IOT_BROKER_HOST=s.broker_host,
            IOT_BROKER_PORT=str(s.broker_port),
            IOT_OBJECT_STORE=s.object_store,
            IOT_LOCAL_STORE_DIR=str(s.local_store_dir),
            IOT_PG_HOST=s.pg_host,
            IOT_PG_PORT=str(s.pg_port),
            IOT_PG_USER=s.pg_user,
            IOT_PG_DB=s.pg_database,
            IOT_DAGSTER_HOST=s.dagster_host,
            IOT_DAGSTER_PORT=str(s.dagster_port),
        )
        return env

    def _start_ingest(self) -> ChildProcess:
        env = self._platform_env()
        env["INGEST_METRICS_PORT"] = str(self.ingest_metrics_port)
        ingest = self._spawn("ingest", [sys.executable, "-m", "ingest_daemon"], env)
        ingest.wait_until(
            lambda: _http_ok(f"{self.ingest_url}/healthz"), timeout=60, what="MQTT connected"
        )
        return ingest

    @property
    def crl_port(self) -> int:
        return listen_port(self.settings.crl_url)

    def _start_crl(self) -> ChildProcess:
        """The CRL distribution point (IOT_CRL_URL) on loopback: `iot-platform crl serve`."""
        argv = [sys.executable, "-m", "iot_platform.cli", "crl", "serve", "--bind", "127.0.0.1"]
        crl = self._spawn("crl", argv, self._platform_env())
        health = f"http://127.0.0.1:{self.crl_port}/healthz"
        crl.wait_until(lambda: _http_ok(health), timeout=30, what="CRL served")
        return crl

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_metrics_port}"

    @functools.cached_property
    def _dagster_env(self) -> dict[str, str]:
        """Webserver and daemon share it; computed once, also across restarts."""
        s = self.settings
        dagster_home = s.home / "dagster_home"
        dagster_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            PROJECT_ROOT / "deploy" / "dagster" / "dagster.yaml", dagster_home / "dagster.yaml"
        )
        env = self._platform_env()
        env.update(
            DAGSTER_HOME=str(dagster_home),
            IOT_PG_PASSWORD=self.pg_password.value,
            IOT_DAGSTER_DB=s.dagster_database,
            IOT_BROKER_PID_FILE=str(self.broker.pid_file),
            IOT_BROKER_ACL_FILE=str(self.broker.config.config_dir / "acl"),
        )
        # The embedded stack is for development: device keys may be generated server-side
        # (written to the certs directory, mode 0600) unless the operator says otherwise.
        env.setdefault("IOT_ALLOW_SERVER_KEYGEN", "true")
        # Dagster resources read secrets through dg.EnvVar: hand them over inline, in the
        # child's environment only (never in run config, logs or files we write).
        env["IOT_CA_PASSPHRASE"] = local_secret(s, "IOT_CA_PASSPHRASE", "ca_passphrase").value
        return env

    @functools.cached_property
    def _code_locations(self) -> list[CodeLocation]:
        """Chosen once: a restarted code server comes back on the same port."""
        return code_locations(WORKSPACE)

    @functools.cached_property
    def _workspace(self) -> Path:
        path = self.settings.home / "dagster_home" / "workspace.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(workspace_of(self._code_locations)))
        return path

    def _end_unfinished_runs(self) -> None:
        """Runs the last stop left in progress died with it: end them before the daemon
        starts, so their hours load on (``iot_platform/unfinished_runs.py``)."""
        done = subprocess.run(
            [sys.executable, "-m", "iot_platform.unfinished_runs"],
            env=self._dagster_env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise ServiceError(f"ending the last stop's unfinished runs failed: {done.stderr}")
        for line in done.stdout.splitlines():
            log.warning("%s", line)

    def _start_code_server(self, location: CodeLocation) -> ChildProcess:
        argv = [str(BINDIR / "dagster"), "code-server", "start", "-h", "127.0.0.1"]
        argv += ["-p", str(location.port), "-m", location.module]
        argv += ["--location-name", location.name]
        # Stopped with its runs: a code server waits for the runs it started before it
        # exits, and a live load run follows its hour; the group is killed after 5 s (the
        # run's transaction rolls back, and the run is retried at the next start).
        server = self._spawn(f"code-{location.name}", argv, self._dagster_env, signal_group=True)
        # The server loads the code before it listens: an open port means loaded.
        server.wait_until(
            lambda: port_is_open("127.0.0.1", location.port), timeout=180, what="code loaded"
        )
        return server

    def _start_webserver(self) -> ChildProcess:
        s = self.settings
        argv = [str(BINDIR / "dagster-webserver"), "-h", s.dagster_host, "-p", str(s.dagster_port)]
        argv += ["-w", str(self._workspace)]
        webserver = self._spawn("dagster-webserver", argv, self._dagster_env)
        webserver.wait_until(
            lambda: _http_ok(f"{self.dagster_url}/server_info"), timeout=180, what="HTTP 200"
        )
        return webserver

    def _start_daemon(self) -> ChildProcess:
        argv = [str(BINDIR / "dagster-daemon"), "run", "-w", str(self._workspace)]
        return self._spawn("dagster-daemon", argv, self._dagster_env)

    def _start_simulator(self) -> ChildProcess:
        """A small fleet enrolled through enroll_device, so a newcomer sees data at once."""
        return self._spawn(
            "simulator",
            [sys.executable, "-m", "iot_platform.cli", "simulate"],
            self._platform_env(),
        )

    @property
    def dagster_url(self) -> str:
        return f"http://{self.settings.dagster_host}:{self.settings.dagster_port}"

    def summary(self) -> str:
        s = self.settings
        return "\n".join(
            [
                "IoT platform is up (Ctrl-C stops everything):",
                f"  Dagster UI   {self.dagster_url}",
                f"  MQTT (mTLS)  mqtts://{s.broker_host}:{s.broker_port}"
                f"  (CA {s.certs_dir / 'ca.crt'})",
                *(
                    [f"  CRL          {s.crl_url}  (served on 127.0.0.1:{self.crl_port})"]
                    if s.crl_url
                    else []
                ),
                f"  Ingest       {self.ingest_url}/metrics  (raw batches: "
                f"{s.local_store_dir if s.object_store == 'local' else s.s3_endpoint})",
                f"  PostgreSQL   postgresql://{s.pg_user}@{s.pg_host}:{s.pg_port}/{s.pg_database}"
                f"  (password: {s.home / 'secrets' / 'pg_password'})",
                f"  Warehouse    {self.warehouse_dialect}",
                f"  Simulator    {self._simulator_summary()}",
                "  Grafana      iot-platform dashboards import --grafana-url URL"
                "  (your Grafana; README: Operations)",
                f"  State, logs  {s.home}  ({self.logs})",
            ]
        )

    def _simulator_summary(self) -> str:
        s = self.settings
        if not s.simulator_devices:
            return "off (IOT_SIMULATOR_DEVICES=0)"
        faults = f", faults {' '.join(s.simulator_faults)}" if s.simulator_faults else ""
        return (
            f"{s.simulator_devices} devices enrolled via enroll_device, every "
            f"{s.simulator_interval_s:g}s{faults}  ({self.logs / 'simulator.log'})"
        )

    def handle_signals(self) -> None:
        """From now on Ctrl-C/SIGTERM/SIGHUP request an orderly stop (see ``watch``).

        Installed before the ready line is printed: a signal sent right after reading it
        must not kill the supervisor before it has stopped its children.
        """

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stopping = True

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, request_stop)

    def watch(self) -> int:
        """Block until a signal; restart a child that exits, unless it keeps crashing."""
        return supervise(self.children, lambda: self._stopping)

    def stop(self) -> None:
        """The clients together (each Dagster process takes seconds to exit), then the
        services in reverse start order: ingest flushes to the store, then the broker, then
        PostgreSQL."""
        clients = [child.process for child in self.children if child.client]
        if clients:
            with ThreadPoolExecutor(max_workers=len(clients)) as pool:
                list(pool.map(ChildProcess.stop, clients))
        for child in reversed(self.children):
            if not child.client:
                child.process.stop()
        self.children.clear()


def _describe_dialect(conn: psycopg.Connection, dialect: Dialect) -> str:
    """The ready line's words for the warehouse dialect, with the extension's version."""
    if dialect is Dialect.POSTGRES:
        return "plain PostgreSQL (TimescaleDB not in use; see IOT_WAREHOUSE_DIALECT)"
    row = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    return f"TimescaleDB {row[0] if row else '?'}"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback URL
            return response.status == 200
    except OSError:
        return False


def run_embedded(settings: PlatformSettings) -> int:
    stack = EmbeddedStack(settings)
    try:
        stack.start()
        stack.handle_signals()
        print(stack.summary(), flush=True)
        return stack.watch()
    except ServiceError as exc:
        log.error("%s", exc)
        return 1
    finally:
        stack.stop()
