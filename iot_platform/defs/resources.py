"""Dagster resources. Secrets come from the environment through ``dg.EnvVar`` only,
so they never appear in run config, the Launchpad or event metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import dagster as dg
import psycopg

from iot_platform.broker_control import (
    INGEST_IDENTITY,
    reload_broker,
    write_acl,
    write_denied_identities,
)
from iot_platform.objectstore import LocalDirectoryStore, ObjectStore, S3Store
from iot_platform.pki import CertificateAuthority
from iot_platform.settings import PlatformSettings, env_str
from iot_platform.warehouse.migrations import Dialect, migrate


class WarehouseResource(dg.ConfigurableResource):
    """The PostgreSQL/TimescaleDB warehouse (database ``IOT_PG_DB``)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    def conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            connect_timeout=10,
            application_name="iot-platform-dagster",
        )

    # Migrated once per process and server: resources run the migration on first use.
    _migrated: ClassVar[dict[str, Dialect]] = {}

    @contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        self.dialect()
        with psycopg.connect(self.conninfo(), autocommit=autocommit) as conn:
            yield conn

    def dialect(self) -> Dialect:
        """The warehouse dialect, migrating the schema first if this process has not yet."""
        server = f"{self.host}:{self.port}/{self.dbname}"
        if server not in self._migrated:
            with psycopg.connect(self.conninfo()) as conn:
                self._migrated[server] = migrate(conn)[0]
        return self._migrated[server]


class ObjectStoreResource(dg.ConfigurableResource):
    """Where the raw batches are: a local directory (embedded) or S3/MinIO."""

    backend: str = "local"
    local_dir: str = ""
    endpoint: str = ""
    bucket: str = "iot-raw"
    secure: bool = False
    access_key: str = ""
    secret_key: str = ""
    timeout_s: float = 10.0

    def store(self) -> ObjectStore:
        if self.backend == "s3":
            return S3Store(
                self.endpoint,
                self.access_key,
                self.secret_key,
                self.bucket,
                secure=self.secure,
                read_timeout_s=self.timeout_s,
            )
        return LocalDirectoryStore(Path(self.local_dir))


class PKIResource(dg.ConfigurableResource):
    """Where the platform CA lives, the passphrase that unlocks its key, and PKI policy."""

    certs_dir: str
    ca_passphrase: str
    crl_days: int = 7
    crl_min_remaining_hours: float = 48
    crl_url: str = ""  # IOT_CRL_URL: the distribution point in every certificate, "" for none
    device_cert_days: int = 365
    allow_server_keygen: bool = False

    def authority(self) -> CertificateAuthority:
        return CertificateAuthority(Path(self.certs_dir), self.ca_passphrase, crl_url=self.crl_url)


class BrokerControlResource(dg.ConfigurableResource):
    """How revocation reaches the broker: the ACL deny list and the CRL, then a reload.

    Embedded stack: the ACL file and PID file of the broker ``up`` started (SIGHUP).
    Compose: the broker's shared config volume; its CRL watcher sends itself SIGHUP.
    """

    pid_file: str = ""
    acl_file: str = ""
    ingest_user: str = INGEST_IDENTITY

    def publish(self, certs_dir: Path, denied: list[str]) -> str:
        """Publish the deny list (CRL already written) and make the broker re-read both."""
        write_denied_identities(certs_dir, denied)
        if self.acl_file:
            write_acl(Path(self.acl_file), self.ingest_user, denied)
        if self.pid_file:
            return f"sent SIGHUP to broker pid {reload_broker(Path(self.pid_file))}"
        return "published; the broker's CRL watcher reloads it within IOT_BROKER_CRL_POLL_S"


def object_store_resource(settings: PlatformSettings) -> ObjectStoreResource:
    """Non-secret settings are plain config (visible in the UI); keys come via dg.EnvVar."""
    if settings.object_store == "s3":
        return ObjectStoreResource(
            backend="s3",
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            timeout_s=settings.s3_timeout_s,
            access_key=dg.EnvVar("IOT_S3_ACCESS_KEY"),
            secret_key=dg.EnvVar("IOT_S3_SECRET_KEY"),
        )
    return ObjectStoreResource(backend="local", local_dir=str(settings.local_store_dir))


def warehouse_resource() -> WarehouseResource:
    """The warehouse from IOT_PG_* (the dbt profile reads the same variables)."""
    return WarehouseResource(
        host=dg.EnvVar("IOT_PG_HOST"),
        port=dg.EnvVar.int("IOT_PG_PORT"),
        user=dg.EnvVar("IOT_PG_USER"),
        password=dg.EnvVar("IOT_PG_PASSWORD"),
        dbname=dg.EnvVar("IOT_PG_DB"),
    )


def build_resources() -> dict[str, dg.ConfigurableResource]:
    settings = PlatformSettings.from_env()
    return {
        "object_store": object_store_resource(settings),
        "warehouse": warehouse_resource(),
        "pki": PKIResource(
            certs_dir=str(settings.certs_dir),
            ca_passphrase=dg.EnvVar("IOT_CA_PASSPHRASE"),
            crl_days=settings.crl_days,
            crl_min_remaining_hours=settings.crl_min_remaining_hours,
            crl_url=settings.crl_url,
            device_cert_days=settings.device_cert_days,
            allow_server_keygen=settings.allow_server_keygen,
        ),
        "broker": BrokerControlResource(
            pid_file=env_str("IOT_BROKER_PID_FILE", ""), acl_file=env_str("IOT_BROKER_ACL_FILE", "")
        ),
    }
