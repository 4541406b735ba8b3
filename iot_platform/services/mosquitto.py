"""Mosquitto configured from the shared template and run as a child process.

The same template renders the compose broker's config (``iot-platform broker config``),
so the embedded stack and docker compose enforce identical TLS and ACL rules.
"""

from __future__ import annotations

import getpass
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from iot_platform.broker_control import (
    INGEST_IDENTITY,
    read_denied_identities,
    render_acl,
    template,
)
from iot_platform.pki import write_public
from iot_platform.services.process import ChildProcess, ServiceError
from iot_platform.settings import PlatformSettings


@dataclass(frozen=True)
class BrokerConfig:
    """Values substituted into the mosquitto.conf and ACL templates."""

    port: int
    certs_dir: Path
    config_dir: Path
    data_dir: Path
    bind_address: str = "127.0.0.1"
    max_inflight: int = 50_000
    max_queued: int = 1_000_000
    # The one payload limit (IOT_MQTT_MAX_PAYLOAD_BYTES): the broker refuses larger
    # publishes with a reason code; the ingest daemon keeps everything it is sent.
    message_size_limit: int = field(
        default_factory=lambda: PlatformSettings.from_env().mqtt_max_payload_bytes
    )
    ingest_user: str = INGEST_IDENTITY
    run_as: str | None = None  # `user` option; None -> the current user (no privilege drop)

    def render(self) -> tuple[str, str]:
        """Return (mosquitto.conf, acl) text."""
        run_as = self.run_as or getpass.getuser()
        values = {
            "port": self.port,
            "bind_address": self.bind_address,
            "certs_dir": self.certs_dir,
            "config_dir": self.config_dir,
            "data_dir": self.data_dir,
            "max_inflight": self.max_inflight,
            "max_queued": self.max_queued,
            "message_size_limit": self.message_size_limit,
            "ingest_user": self.ingest_user,
            # Mosquitto started as root drops to user `mosquitto` before reading keys;
            # naming the current user keeps it able to read the certs it was given.
            "user_line": f"user {run_as}",
        }
        acl = render_acl(self.ingest_user, read_denied_identities(self.certs_dir))
        return template("mosquitto.conf.tmpl").substitute(values), acl

    def write(self) -> Path:
        conf, acl = self.render()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_public(self.config_dir / "acl", acl.encode())
        conf_path = self.config_dir / "mosquitto.conf"
        write_public(conf_path, conf.encode())
        return conf_path


def mosquitto_binary() -> str:
    for candidate in ("mosquitto", "/usr/sbin/mosquitto"):
        found = shutil.which(candidate)
        if found:
            return found
    raise ServiceError("mosquitto not found: apt-get install mosquitto")


class MosquittoBroker:
    """A broker process for one rendered config; ``reload()`` re-reads the CRL (SIGHUP)."""

    def __init__(self, config: BrokerConfig, *, log_path: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path or config.config_dir / "mosquitto.log"
        self.process: ChildProcess | None = None

    def start(self, *, timeout: float = 20.0) -> MosquittoBroker:
        conf_path = self.config.write()
        self.process = ChildProcess(
            "mosquitto", [mosquitto_binary(), "-c", str(conf_path)], self.log_path
        ).start()
        self.process.wait_for_port("127.0.0.1", self.config.port, timeout=timeout)
        return self

    @property
    def pid_file(self) -> Path:
        return self.config.data_dir / "mosquitto.pid"

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its config and CRL for new connections."""
        if self.process is None or not self.process.running():
            raise ServiceError("mosquitto is not running")
        self.process.signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
