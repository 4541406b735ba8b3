"""The embedded stack for benchmarks: ``iot-platform up`` exactly as ``scripts/up.sh`` runs it.

Default settings (every ``IOT_*``/``INGEST_*`` variable of the caller's shell is dropped),
with a temporary home and free ports so a benchmark never disturbs a running stack.
Devices are registered and given real certificates from the stack's CA.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from iot_platform.pki import CertificateAuthority
from iot_platform.services.process import free_port

READY = "IoT platform is up"


class EmbeddedStack:
    """``bindir``: PostgreSQL server binaries for the warehouse (IOT_PG_BINDIR), e.g. a
    TimescaleDB build (README: TimescaleDB); default the system's."""

    def __init__(self, prefix: str, *, bindir: Path | None = None, **overrides: str) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"iot-bench-{prefix}-"))
        self.home.chmod(0o755)  # PostgreSQL runs as user `postgres` when started as root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IOT_", "INGEST_"))}
        env.update(
            IOT_HOME=str(self.home / "state"),
            IOT_CERTS_DIR=str(self.home / "certs"),
            IOT_PG_PORT=str(free_port()),
            IOT_BROKER_PORT=str(free_port()),
            IOT_DAGSTER_PORT=str(free_port()),
            INGEST_METRICS_PORT=str(free_port()),
            IOT_SIMULATOR_DEVICES="0",
        )
        if bindir is not None:
            env["IOT_PG_BINDIR"] = str(bindir)
        env.update(overrides)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 300) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iot_platform.cli", "up"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if READY in line:
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("iot-platform up did not become ready")

    def stop(self, *, keep_home: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if keep_home:
            print(f"stack state kept in {self.home}", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def secret(self, name: str) -> str:
        return (Path(self.env["IOT_HOME"]) / "secrets" / name).read_text().strip()

    @property
    def conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1",
            port=int(self.env["IOT_PG_PORT"]),
            user="iot",
            dbname="iot",
            password=self.secret("pg_password"),
        )

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(Path(self.env["IOT_CERTS_DIR"]), self.secret("ca_passphrase"))

    @property
    def broker_port(self) -> int:
        return int(self.env["IOT_BROKER_PORT"])

    @property
    def dagster_url(self) -> str:
        return f"http://127.0.0.1:{self.env['IOT_DAGSTER_PORT']}"

    def dialect(self) -> str:
        """What the warehouse runs on: ``timescaledb`` or ``postgresql``."""
        with psycopg.connect(self.conninfo) as conn:
            row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            return "timescaledb" if row.fetchone() else "postgresql"

    def register_devices(self, device_ids: list[str]) -> None:
        """Registry rows and a real client certificate (CN = device id) for each device."""
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute("INSERT INTO devices (device_id) SELECT unnest(%s::text[])", [device_ids])
        ca = self.ca
        for device_id in device_ids:
            ca.issue_device_certificate(device_id)
