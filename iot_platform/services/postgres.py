"""A PostgreSQL server from the system's binaries, initialised into a data folder of ours.

Used by the embedded stack (``.iot/postgres``) and by the test fixtures (a temp folder
on an ephemeral port). It runs as a direct child (no ``pg_ctl`` daemonising), so it
is ended by its PID.
"""

from __future__ import annotations

import glob
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


class PostgresServer:
    """One cluster: ``data_dir`` holds the data, the socket and the log."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        password: str,
        user: str = "iot",
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.user = user
        self._password = password
        self.bindir = postgres_bindir()
        self.os_user = unprivileged_user("postgres")
        self.process: ChildProcess | None = None

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
            ],
            self.data_dir / "postgres.log",
            user=self.os_user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
        ).start()
        self.process.wait_until(self._accepts_connections, timeout=timeout, what="connections")
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
