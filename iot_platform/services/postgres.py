"""A PostgreSQL server from the system's binaries, initialised into a data folder of ours.

Used by the embedded stack (``.iot/postgres``) and by the test fixtures (a temp folder
on an ephemeral port). It runs as a direct child (no ``pg_ctl`` daemonising), so it
is ended by its PID.

TimescaleDB must be in ``shared_preload_libraries`` before ``CREATE EXTENSION`` works, so
the server preloads it whenever the extension is installed for these binaries (and
IOT_WAREHOUSE_DIALECT allows it). A library that is installed but does not load (built for
another server version, a missing dependency) is logged and the server starts without it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from iot_platform.services.process import (
    ChildProcess,
    ServiceError,
    chown_tree,
    unprivileged_user,
)
from iot_platform.settings import warehouse_dialect_setting

log = logging.getLogger(__name__)

TIMESCALEDB = "timescaledb"


def postgres_bindir() -> Path:
    """``IOT_PG_BINDIR``, else the newest /usr/lib/postgresql/*/bin, else the PATH."""
    configured = os.environ.get("IOT_PG_BINDIR")
    if configured:
        return Path(configured)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ServiceError("PostgreSQL server binaries not found: apt-get install postgresql")


def timescaledb_installed(bindir: Path) -> bool:
    """Whether the TimescaleDB extension is installed for the server in ``bindir``: its
    control file in the server's share directory and its loader in the library directory,
    as that server's ``pg_config`` reports them (a relocated server finds its own)."""
    try:
        result = subprocess.run(
            [str(bindir / "pg_config"), "--sharedir", "--pkglibdir"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    sharedir, pkglibdir = (Path(line) for line in result.stdout.splitlines()[:2])
    return (sharedir / "extension" / f"{TIMESCALEDB}.control").is_file() and (
        pkglibdir / f"{TIMESCALEDB}.so"
    ).is_file()


class PostgresServer:
    """One cluster: ``data_dir`` holds the data, the socket and the log.

    ``dialect`` (an IOT_WAREHOUSE_DIALECT value, default the setting) decides whether
    TimescaleDB is preloaded: ``auto`` when installed, ``timescaledb`` always (a server
    that cannot load it is a ServiceError), ``postgresql`` never. After ``start``,
    ``timescaledb_loaded`` says what the running server has.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        password: str,
        user: str = "iot",
        host: str = "127.0.0.1",
        bindir: Path | None = None,
        dialect: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.user = user
        self._password = password
        self.bindir = bindir or postgres_bindir()
        self.dialect = dialect or warehouse_dialect_setting()
        self.os_user = unprivileged_user("postgres")
        self.process: ChildProcess | None = None
        self.timescaledb_loaded = False

    def wants_timescaledb(self) -> bool:
        if self.dialect == "postgresql":
            return False
        installed = timescaledb_installed(self.bindir)
        if not installed and self.dialect == TIMESCALEDB:
            raise ServiceError(
                f"IOT_WAREHOUSE_DIALECT=timescaledb but the TimescaleDB extension is not "
                f"installed for the server in {self.bindir} (see README: TimescaleDB)"
            )
        return installed

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / "cluster"

    def conninfo(self, dbname: str = "postgres") -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self._password,
            dbname=dbname,
            connect_timeout=5,
        )

    def initialise(self) -> bool:
        """``initdb`` on first use (scram auth, our superuser); returns True if it ran."""
        if (self.cluster_dir / "PG_VERSION").exists():
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chown_tree(self.data_dir, self.os_user)
        with tempfile.NamedTemporaryFile("w", dir=self.data_dir, delete=False) as pw:
            pw.write(self._password)
        pwfile = Path(pw.name)
        chown_tree(pwfile, self.os_user)
        try:
            result = subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.cluster_dir),
                    "-U",
                    self.user,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                check=False,
                user=self.os_user.pw_uid if self.os_user else None,
                group=self.os_user.pw_gid if self.os_user else None,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        return True

    def start(self, *, timeout: float = 60.0) -> PostgresServer:
        self.initialise()
        socket_dir = self.data_dir / "socket"
        socket_dir.mkdir(exist_ok=True)
        chown_tree(socket_dir, self.os_user)
        if self.wants_timescaledb():
            log_start = self._log_size()
            try:
                return self._start(socket_dir, [TIMESCALEDB], timeout=timeout)
            except ServiceError:
                failure = self._log_since(log_start)
                if self.dialect == TIMESCALEDB or TIMESCALEDB not in failure:
                    raise
                log.warning(
                    "TimescaleDB is installed for %s but the server cannot load it; "
                    "starting plain PostgreSQL instead (set IOT_WAREHOUSE_DIALECT=postgresql "
                    "to skip the attempt). The server said:\n%s",
                    self.bindir,
                    failure.strip(),
                )
        return self._start(socket_dir, [], timeout=timeout)

    def _log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def _log_size(self) -> int:
        try:
            return self._log_path().stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        with self._log_path().open("rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode(errors="replace")

    def _start(self, socket_dir: Path, preload: list[str], *, timeout: float) -> PostgresServer:
        self.process = ChildProcess(
            "postgres",
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.cluster_dir),
                "-p",
                str(self.port),
                "-h",
                self.host,
                "-k",
                str(socket_dir),
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "log_min_messages=warning",
                "-c",
                f"shared_preload_libraries={','.join(preload)}",
                # Our own loader only: no telemetry calls home from a test or a laptop.
                *(["-c", "timescaledb.telemetry_level=off"] if preload else []),
            ],
            self._log_path(),
            user=self.os_user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
        ).start()
        self.process.wait_until(self._accepts_connections, timeout=timeout, what="connections")
        self.timescaledb_loaded = TIMESCALEDB in preload
        return self

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def ensure_database(self, name: str) -> bool:
        """Create database ``name`` if absent; returns True if it was created."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists:
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
