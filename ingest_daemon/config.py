"""Ingest daemon settings: every variable it reads, in one place, validated at start."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from iot_platform.rawbatch import validate_instance
from iot_platform.settings import (
    PlatformSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
)
from iot_platform.topics import ingest_subscriptions

# Exactly the topic families the broker lets devices publish (iot_platform.topics).
DEFAULT_TOPICS = ingest_subscriptions()


DEFAULT_METRICS_PORT = 9108
# A batch closes this long after its first message at most (the light-load latency floor);
# bench/lake.py generates a day of traffic at this age.
DEFAULT_MAX_AGE_S = 1.0


def _default_instance() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48] or "ingest"


@dataclass(frozen=True)
class IngestSettings:
    instance_id: str
    client_id: str
    share_group: str
    topics: tuple[str, ...]
    broker_host: str
    broker_port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    keepalive_s: int
    session_expiry_s: int
    receive_maximum: int
    max_rows: int
    max_bytes: int
    max_age_s: float
    spool_dir: Path
    spool_max_bytes: int
    metrics_host: str
    metrics_port: int
    shutdown_timeout_s: float

    @classmethod
    def from_env(cls) -> IngestSettings:
        platform = PlatformSettings.from_env()
        try:
            instance = validate_instance(env_str("INGEST_INSTANCE_ID", _default_instance()))
        except ValueError as exc:
            raise SettingsError(f"INGEST_INSTANCE_ID: {exc}") from None
        topics = tuple(
            t.strip() for t in env_str("INGEST_TOPICS", ",".join(DEFAULT_TOPICS)).split(",")
        )
        if not all(topics) or any(t.startswith("$") for t in topics):
            raise SettingsError(
                "INGEST_TOPICS must be a comma-separated list of plain topic filters "
                "(the $share prefix is added from INGEST_SHARE_GROUP)"
            )
        services = platform.certs_dir / "services"
        settings = cls(
            instance_id=instance,
            client_id=env_str("INGEST_CLIENT_ID", f"ingest-{instance}"),
            share_group=env_str("INGEST_SHARE_GROUP", "ingest"),
            topics=topics,
            broker_host=platform.broker_host,
            broker_port=platform.broker_port,
            ca_file=Path(env_str("INGEST_CA_FILE", str(platform.certs_dir / "ca.crt"))),
            cert_file=Path(env_str("INGEST_CERT_FILE", str(services / "ingest.crt"))),
            key_file=Path(env_str("INGEST_KEY_FILE", str(services / "ingest.key"))),
            keepalive_s=env_int("INGEST_KEEPALIVE_S", 30, minimum=5),
            session_expiry_s=env_int("INGEST_SESSION_EXPIRY_S", 7 * 24 * 3600, minimum=60),
            receive_maximum=env_int("INGEST_RECEIVE_MAXIMUM", 65535, minimum=1),
            max_rows=env_int("INGEST_MAX_ROWS", 20_000, minimum=1),
            max_bytes=env_int("INGEST_MAX_BYTES", 32 * 1024 * 1024, minimum=1024),
            max_age_s=env_float("INGEST_MAX_AGE_S", DEFAULT_MAX_AGE_S, minimum=0.05),
            spool_dir=Path(env_str("INGEST_SPOOL_DIR", str(platform.home / "spool" / instance))),
            spool_max_bytes=env_int("INGEST_SPOOL_MAX_BYTES", 1024**3, minimum=0),
            metrics_host=env_str("INGEST_METRICS_HOST", "127.0.0.1"),
            metrics_port=env_int("INGEST_METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0),
            shutdown_timeout_s=env_float("INGEST_SHUTDOWN_TIMEOUT_S", 30.0, minimum=1),
        )
        if env_str("INGEST_MAX_PAYLOAD_BYTES", ""):
            raise SettingsError(
                "INGEST_MAX_PAYLOAD_BYTES is gone: the daemon keeps every payload the broker "
                "accepts; set the one limit with IOT_MQTT_MAX_PAYLOAD_BYTES"
            )
        settings.check_files()
        if settings.max_rows > settings.receive_maximum:
            raise SettingsError(
                f"INGEST_MAX_ROWS={settings.max_rows} exceeds INGEST_RECEIVE_MAXIMUM="
                f"{settings.receive_maximum}: a batch could never fill before acks stop the flow"
            )
        return settings

    def check_files(self) -> None:
        for name, path in (
            ("INGEST_CA_FILE", self.ca_file),
            ("INGEST_CERT_FILE", self.cert_file),
            ("INGEST_KEY_FILE", self.key_file),
        ):
            if not path.is_file():
                raise SettingsError(f"{name}={path} does not exist (run `iot-platform pki init`)")

    @property
    def subscriptions(self) -> list[str]:
        return [f"$share/{self.share_group}/{topic}" for topic in self.topics]
