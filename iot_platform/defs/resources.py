"""Dagster resources. Secrets come from the environment through ``dg.EnvVar`` only,
so they never appear in run config, the Launchpad or event metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg

from iot_platform.pki import CertificateAuthority
from iot_platform.services.mosquitto import reload_broker


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

    @contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        with psycopg.connect(self.conninfo(), autocommit=autocommit) as conn:
            yield conn


class PKIResource(dg.ConfigurableResource):
    """Where the platform CA lives and the passphrase that unlocks its key."""

    certs_dir: str
    ca_passphrase: str

    def authority(self) -> CertificateAuthority:
        return CertificateAuthority(Path(self.certs_dir), self.ca_passphrase)


class BrokerControlResource(dg.ConfigurableResource):
    """How a new CRL reaches the broker: a PID file to SIGHUP (embedded stack)."""

    pid_file: str

    def reload(self) -> int:
        return reload_broker(Path(self.pid_file))


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "warehouse": WarehouseResource(
            host=dg.EnvVar("IOT_PG_HOST"),
            port=dg.EnvVar.int("IOT_PG_PORT"),
            user=dg.EnvVar("IOT_PG_USER"),
            password=dg.EnvVar("IOT_PG_PASSWORD"),
            dbname=dg.EnvVar("IOT_PG_DB"),
        ),
        "pki": PKIResource(
            certs_dir=dg.EnvVar("IOT_CERTS_DIR"), ca_passphrase=dg.EnvVar("IOT_CA_PASSPHRASE")
        ),
        "broker": BrokerControlResource(pid_file=dg.EnvVar("IOT_BROKER_PID_FILE")),
    }
