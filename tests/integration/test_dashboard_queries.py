"""Every SQL query of the Grafana dashboards, as Grafana's PostgreSQL datasource sends it,
returns rows from a real warehouse with data: plain PostgreSQL (read as the read-only
``iot_grafana`` role the migrations create, with the password from its secret setting) and
the TimescaleDB double (hypertable, continuous aggregates).

Each query runs over four time ranges ending now (1 hour to 90 days: the Device
dashboard's zoom levels), and the Device metrics panel is checked to answer from the
source that fits each zoom (raw, 1-minute, 1-hour, 1-day rollups).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from iot_platform.health import RULES, HealthSettings, evaluate
from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.warehouse.aggregates import ROLLUPS, refresh
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from iot_platform.warehouse.migrations import GRAFANA_ROLE, Dialect, migrate
from tests.grafana import SqlQuery, datasources, interpolate, sql_queries
from tests.integration.test_pipeline import _warehouse
from tests.warehouse_data import put_batch, telemetry_messages

pytestmark = pytest.mark.integration

DEVICE = "dev-a"
ZOOMS = {
    "1h": dt.timedelta(hours=1),
    "1d": dt.timedelta(days=1),
    "7d": dt.timedelta(days=7),
    "90d": dt.timedelta(days=90),
}
# The source the Device metrics panel must answer from at each zoom.
ZOOM_SOURCE = {
    "1h": "SELECT count(*) FROM telemetry WHERE device_id = %s AND ts BETWEEN %s AND %s",
    "1d": "SELECT count(*) FROM telemetry_1m WHERE device_id = %s AND bucket BETWEEN %s AND %s",
    "7d": "SELECT count(*) FROM telemetry_1h WHERE device_id = %s AND bucket BETWEEN %s AND %s",
    "90d": "SELECT count(*) FROM telemetry_1d WHERE device_id = %s AND bucket BETWEEN %s AND %s",
}
QUERIES = list(sql_queries())
TIMESCALEDB_OPTION = bool(datasources()["iot-warehouse"]["jsonData"]["timescaledb"])


def _envelope(device_id: str, seq: int, ts: dt.datetime, **fields: object) -> bytes:
    return json.dumps(
        {"v": 2, "device_id": device_id, "ts": ts.isoformat(), "seq": seq, **fields}
    ).encode()


def seed(conn: psycopg.Connection, store_dir, now: dt.datetime) -> None:
    """Three devices (dev-c registered but silent), certificates, 20 minutes of telemetry,
    hello and status events, a reject; one load; rollups refreshed; health evaluated."""
    conn.execute(
        "INSERT INTO devices (device_id, device_type) VALUES "
        "('dev-a', 'meter-dc'), ('dev-b', 'generic'), ('dev-c', 'generic')"
    )
    conn.execute(
        """INSERT INTO device_certificates
               (serial_hex, device_id, fingerprint_sha256, not_before, not_after)
           VALUES ('c1', 'dev-a', 'f1', %(since)s, %(now)s + interval '10 days'),
                  ('c2', 'dev-b', 'f2', %(since)s, %(now)s + interval '300 days')""",
        {"now": now, "since": now - dt.timedelta(days=1)},
    )
    conn.commit()
    start = now - dt.timedelta(minutes=20)
    messages = telemetry_messages(["dev-a", "dev-b"], start, 110)
    hello = _envelope(
        "dev-a", 1000, now - dt.timedelta(minutes=2), msg_type="hello", fw_version="2.1.0",
        uptime_s=86400, broker_connections=1, buf_usage_pct=3, temp_internal=41.0,
    )  # fmt: skip
    status = _envelope("dev-a", 1001, now - dt.timedelta(minutes=1), status="online")
    messages += [
        (now - dt.timedelta(minutes=2), "iot/dev-a/hello", hello),
        (now - dt.timedelta(minutes=1), "iot/dev-a/status", status),
        (now - dt.timedelta(seconds=30), "iot/dev-b/telemetry", b"{not json"),
    ]
    store = LocalDirectoryStore(store_dir)
    load_object(
        conn,
        store,
        put_batch(store, messages, seq=1),
        run_id="dashboards-run",
        parameters=load_parameters(conn),
        devices=known_devices(conn),
        max_payload_bytes=262144,
    )
    conn.commit()


def finish(conn: psycopg.Connection, dialect: Dialect, now: dt.datetime) -> None:
    """Rollups over the loaded window (autocommit: TimescaleDB refreshes need it), health."""
    lo, hi = conn.execute(
        "SELECT min(refresh_from), max(refresh_to) FROM ingest_batches"
    ).fetchone()
    conn.commit()
    conn.autocommit = True
    for name in ROLLUPS:
        refresh(conn, dialect, name, lo, hi)
    conn.autocommit = False
    settings = HealthSettings.from_env()
    for rule in RULES:
        evaluate(conn, rule, settings, now)
    conn.commit()


@pytest.fixture(scope="module")
def postgres_reader(
    postgres_server, tmp_path_factory
) -> Iterator[tuple[psycopg.Connection, dt.datetime]]:
    """Plain PostgreSQL, migrated with IOT_GRAFANA_DB_PASSWORD set; a connection as the
    Grafana role (what the provisioned datasource logs in as)."""
    password = secrets.token_urlsafe(18)
    now = dt.datetime.now(dt.UTC)
    name = f"dash_{secrets.token_hex(4)}"
    postgres_server.ensure_database(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IOT_GRAFANA_DB_PASSWORD", password)
        warehouse = _warehouse(postgres_server.conninfo(name))
        with warehouse.connect() as conn:
            seed(conn, tmp_path_factory.mktemp("dash-objects"), now)
            finish(conn, Dialect.POSTGRES, now)
    params = psycopg.conninfo.conninfo_to_dict(postgres_server.conninfo(name))
    params.update(user=GRAFANA_ROLE, password=password)
    with psycopg.connect(psycopg.conninfo.make_conninfo(**params), autocommit=True) as reader:
        yield reader, dt.datetime.now(dt.UTC)  # the dashboards are looked at after the load


@pytest.fixture(scope="module")
def timescale_conn(
    timescaledb, tmp_path_factory
) -> Iterator[tuple[psycopg.Connection, dt.datetime]]:
    """The TimescaleDB dialect (the double, or a real server), the warehouse in a schema of
    its own (the double is one shared session)."""
    with timescaledb.schema("dash") as (conn, _schema):
        now = dt.datetime.now(dt.UTC)
        assert migrate(conn, "auto")[0] is Dialect.TIMESCALE
        seed(conn, tmp_path_factory.mktemp("dash-objects"), now)
        finish(conn, Dialect.TIMESCALE, now)
        conn.autocommit = True
        yield conn, dt.datetime.now(dt.UTC)  # looked at after the load


def _run(conn: psycopg.Connection, query: SqlQuery, now: dt.datetime, zoom: str, ts_option: bool):
    text = interpolate(
        query.sql,
        start=now - ZOOMS[zoom],
        end=now + dt.timedelta(seconds=1),
        timescaledb=ts_option,
        variables={"device": DEVICE},
    )
    with conn.cursor() as cur:
        cur.execute(text.encode())  # no parameters: exactly the text Grafana would send
        columns = [c.name for c in cur.description or []]
        return columns, cur.fetchall()


def _assert_answers(columns: list[str], rows: list[tuple], query: SqlQuery) -> None:
    assert rows, f"{query.where}: no rows"
    assert any(v not in (None, 0) for row in rows for v in row), f"{query.where}: only 0/NULL"
    if query.format == "time_series":
        assert "time" in columns, f"{query.where}: a time series needs a time column"


@pytest.mark.parametrize("zoom", list(ZOOMS))
@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_query_returns_rows_on_postgresql(postgres_reader, query, zoom):
    conn, now = postgres_reader
    for ts_option in {TIMESCALEDB_OPTION, False}:  # as provisioned, and a plain datasource
        columns, rows = _run(conn, query, now, zoom, ts_option)
        _assert_answers(columns, rows, query)


@pytest.mark.parametrize("zoom", list(ZOOMS))
@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_query_returns_rows_on_timescaledb(timescale_conn, query, zoom):
    conn, now = timescale_conn
    columns, rows = _run(conn, query, now, zoom, TIMESCALEDB_OPTION)
    _assert_answers(columns, rows, query)


@pytest.mark.parametrize("zoom", list(ZOOMS))
def test_device_metrics_come_from_the_rollup_that_fits_the_zoom(postgres_reader, zoom):
    conn, now = postgres_reader
    [query] = [q for q in QUERIES if q.where.startswith("device.json / Metrics")]
    _, rows = _run(conn, query, now, zoom, TIMESCALEDB_OPTION)
    start, end = now - ZOOMS[zoom], now + dt.timedelta(seconds=1)
    (expected,) = conn.execute(ZOOM_SOURCE[zoom], [DEVICE, start, end]).fetchone()
    assert expected > 0 and len(rows) == expected


def test_the_grafana_role_reads_but_cannot_write(postgres_reader):
    conn, _ = postgres_reader
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] > 0
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("DELETE FROM devices")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("BEGIN READ WRITE; DELETE FROM devices")
    conn.execute("ROLLBACK")
