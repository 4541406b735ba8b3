"""Which dialect the warehouse uses, and that an unusable TimescaleDB never crashes a start.

The server side runs real PostgreSQL binaries: the system's, a copy of them with a
TimescaleDB that cannot load, and (when IOT_TEST_PG_BINDIR has it) a real TimescaleDB.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from iot_platform.services.postgres import PostgresServer, postgres_bindir, timescaledb_installed
from iot_platform.services.process import ServiceError, free_port
from iot_platform.warehouse.migrations import TIME_BUCKET, Dialect, DialectError, migrate
from tests.fixtures.timescale import TEST_BINDIR_ENV

pytestmark = pytest.mark.integration


def _pg_config(bindir: Path, *options: str) -> list[Path]:
    out = subprocess.run(
        [str(bindir / "pg_config"), *options], capture_output=True, text=True, check=True
    ).stdout
    return [Path(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def broken_timescaledb_bindir() -> Iterator[Path]:
    """A relocated copy of the system's server binaries where TimescaleDB is "installed"
    (control file and loader present) but its library is not a loadable object."""
    system = postgres_bindir()
    sharedir, pkglibdir = _pg_config(system, "--sharedir", "--pkglibdir")
    root = Path(tempfile.mkdtemp(prefix="iot-test-broken-tsdb-"))
    root.chmod(0o755)  # the server may run as user `postgres`
    try:
        for source in (system.parent, sharedir):
            shutil.copytree(source, root / source.relative_to("/"), symlinks=True)
        bindir = root / system.relative_to("/")
        copied_share, copied_lib = _pg_config(bindir, "--sharedir", "--pkglibdir")
        assert copied_lib == root / pkglibdir.relative_to("/"), "the copy is not relocatable"
        (copied_share / "extension" / "timescaledb.control").write_text(
            "default_version = '2.17.2'\nmodule_pathname = '$libdir/timescaledb'\n"
        )
        (copied_lib / "timescaledb.so").write_bytes(b"not an ELF object")
        yield bindir
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _server(bindir: Path, dialect: str) -> tuple[PostgresServer, Path]:
    data_dir = Path(tempfile.mkdtemp(prefix="iot-test-dialect-"))
    server = PostgresServer(
        data_dir,
        port=free_port(),
        password=secrets.token_urlsafe(12),
        bindir=bindir,
        dialect=dialect,
    )
    return server, data_dir


def test_installed_but_unloadable_timescaledb_falls_back_to_plain_postgres(
    broken_timescaledb_bindir, caplog
):
    assert timescaledb_installed(broken_timescaledb_bindir)
    server, data_dir = _server(broken_timescaledb_bindir, "auto")
    caplog.set_level(logging.WARNING, logger="iot_platform.services.postgres")
    try:
        server.start()
        assert server.timescaledb_loaded is False
        warning = "\n".join(r.getMessage() for r in caplog.records)
        assert "cannot load it; starting plain PostgreSQL" in warning
        assert "timescaledb" in warning.split("The server said:")[1]  # the server's reason
        server.ensure_database("iot")
        with psycopg.connect(server.conninfo("iot")) as conn:
            dialect, applied = migrate(conn, "auto")
        assert dialect is Dialect.POSTGRES
        assert f"{TIME_BUCKET.version:03d} {TIME_BUCKET.name}" in applied
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_insisting_on_timescaledb_that_cannot_load_is_a_clear_error(broken_timescaledb_bindir):
    server, data_dir = _server(broken_timescaledb_bindir, "timescaledb")
    try:
        with pytest.raises(ServiceError, match="timescaledb"):
            server.start()
        assert not server.process or not server.process.running()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_insisting_on_timescaledb_where_none_is_installed_names_the_bindir(tmp_path):
    system = postgres_bindir()
    if timescaledb_installed(system):
        pytest.skip(f"{system} has TimescaleDB installed")
    server, data_dir = _server(system, "timescaledb")
    with pytest.raises(ServiceError, match="not installed for the server in"):
        server.start()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_a_warehouse_keeps_its_dialect_and_says_so_when_asked_for_another(postgres_db):
    with psycopg.connect(postgres_db) as conn:
        assert migrate(conn, "postgresql")[0] is Dialect.POSTGRES
        with pytest.raises(DialectError, match="created as postgresql"):
            migrate(conn, "timescaledb")
        assert migrate(conn, "auto") == (Dialect.POSTGRES, [])


def test_auto_where_timescaledb_is_not_installed_is_plain_postgres(postgres_db, caplog):
    caplog.set_level(logging.INFO, logger="iot_platform.warehouse.migrations")
    with psycopg.connect(postgres_db) as conn:
        assert migrate(conn, "auto")[0] is Dialect.POSTGRES
    (record,) = [r for r in caplog.records if "TimescaleDB not available" in r.getMessage()]
    assert record.levelno == logging.INFO  # the ordinary case, not a warning


def _not_preloaded(bindir: Path, caplog) -> None:
    """The issue's crash: the extension is installed, the server did not preload it."""
    server, data_dir = _server(bindir, "postgresql")
    caplog.set_level(logging.INFO, logger="iot_platform.warehouse.migrations")
    try:
        server.start()
        assert not server.timescaledb_loaded
        server.ensure_database("iot")
        with psycopg.connect(server.conninfo("iot")) as conn:
            assert migrate(conn, "auto")[0] is Dialect.POSTGRES
        (record,) = [r for r in caplog.records if "TimescaleDB not available" in r.getMessage()]
        assert record.levelno == logging.WARNING
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_installed_but_not_preloaded_never_crashes_the_migration(broken_timescaledb_bindir, caplog):
    _not_preloaded(broken_timescaledb_bindir, caplog)


@pytest.mark.skipif(
    not os.environ.get(TEST_BINDIR_ENV), reason=f"{TEST_BINDIR_ENV} (a real TimescaleDB) not set"
)
def test_a_real_timescaledb_not_preloaded_never_crashes_the_migration(caplog):
    _not_preloaded(Path(os.environ[TEST_BINDIR_ENV]), caplog)


def test_timescale_migration_reports_only_what_it_ran(timescaledb):
    """On TimescaleDB the plain-PostgreSQL-only migration (time_bucket) is recorded but not
    reported as applied: the start-up log must not claim it ran."""
    with timescaledb.schema("wh") as (conn, _schema):
        dialect, applied = migrate(conn, "timescaledb")
        assert dialect is Dialect.TIMESCALE
        assert applied and not any("plain PostgreSQL" in name for name in applied)
        recorded = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert (TIME_BUCKET.version,) in recorded


@pytest.mark.skipif(
    not os.environ.get(TEST_BINDIR_ENV), reason=f"{TEST_BINDIR_ENV} (a real TimescaleDB) not set"
)
def test_auto_preloads_an_installed_timescaledb_and_the_warehouse_uses_it():
    server, data_dir = _server(Path(os.environ[TEST_BINDIR_ENV]), "auto")
    try:
        server.start()
        assert server.timescaledb_loaded
        server.ensure_database("iot")
        with psycopg.connect(server.conninfo("iot")) as conn:
            assert migrate(conn, "auto")[0] is Dialect.TIMESCALE
            hypertables = conn.execute(
                "SELECT hypertable_name FROM timescaledb_information.hypertables"
            ).fetchall()
        assert hypertables == [("telemetry",)]
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_db_migrate_says_why_it_will_not_switch_a_warehouse_dialect(postgres_db, tmp_path):
    params = psycopg.conninfo.conninfo_to_dict(postgres_db)
    env = {
        **os.environ,
        "IOT_HOME": str(tmp_path),
        "IOT_PG_HOST": str(params["host"]),
        "IOT_PG_PORT": str(params["port"]),
        "IOT_PG_USER": str(params["user"]),
        "IOT_PG_PASSWORD": str(params["password"]),
        "IOT_PG_DB": str(params["dbname"]),
    }
    cli = [sys.executable, "-m", "iot_platform.cli", "db", "migrate"]
    first = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "(postgresql): applied" in first.stdout
    env["IOT_WAREHOUSE_DIALECT"] = "timescaledb"
    refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "created as postgresql" in refused.stderr and "Traceback" not in refused.stderr
