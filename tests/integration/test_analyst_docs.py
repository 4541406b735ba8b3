"""Every query in docs/analysts.md runs against real data: SQL on the warehouse, Polars and
DuckDB on the raw Parquet in a local store and on the S3 server."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
from pathlib import Path

import pytest

from iot_platform.health import RULES, HealthSettings, evaluate
from iot_platform.lake import compact_hour, hour_start
from iot_platform.objectstore import LocalDirectoryStore, S3Store
from iot_platform.settings import LakeSettings
from iot_platform.warehouse.aggregates import ROLLUPS, refresh
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from iot_platform.warehouse.migrations import Dialect
from tests.integration.test_pipeline import _warehouse
from tests.warehouse_data import put_batch, telemetry_messages

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "analysts.md"
BLOCKS = re.findall(r"```(sql|python)\n(.*?)```", DOC.read_text(), flags=re.S)
SQL = [code for lang, code in BLOCKS if lang == "sql"]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
RESULT_NAMES = ("per_topic", "telemetry_json", "per_hour", "rows")


def _messages():
    now = dt.datetime.now(dt.UTC)
    messages = telemetry_messages(["dev-a", "dev-b"], now - dt.timedelta(minutes=20), 60)
    messages.append((now - dt.timedelta(minutes=1), "iot/dev-a/telemetry", b"{bad json"))
    return messages


@pytest.fixture(scope="module")
def data(postgres_server, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyst")
    postgres_server.ensure_database("analyst")
    warehouse = _warehouse(postgres_server.conninfo("analyst"))
    local = LocalDirectoryStore(root / "objects")
    s3 = S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, "analyst-raw")
    s3.ensure_ready()
    messages = _messages()
    with warehouse.connect() as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES ('dev-a'), ('dev-b')")
        conn.commit()
        info = put_batch(local, messages, seq=1)
        put_batch(s3, messages, seq=1)
        # the same traffic three hours earlier, compacted: the lake snippets read it
        earlier = [(at - dt.timedelta(hours=3), topic, payload) for at, topic, payload in messages]
        lake_settings = LakeSettings.from_env()
        for store in (local, s3):
            put_batch(store, earlier, seq=2)
            for hour in {hour_start(at) for at, _, _ in earlier}:
                compact_hour(
                    store,
                    hour,
                    dt.datetime.now(dt.UTC),
                    lateness=dt.timedelta(seconds=lake_settings.lateness_s),
                    max_rows=lake_settings.file_max_rows,
                )
        load_object(
            conn,
            local,
            info,
            run_id="docs",
            parameters=load_parameters(conn),
            devices=known_devices(conn),
            max_payload_bytes=262144,
        )
        conn.commit()
        lo, hi = conn.execute("SELECT min(ts), max(ts) FROM telemetry").fetchone()
        for name in ROLLUPS:
            refresh(conn, Dialect.POSTGRES, name, lo, hi)
        for rule in RULES:
            evaluate(conn, rule, HealthSettings.from_env())
    return {"warehouse": warehouse, "local_dir": root / "objects", "s3": s3_server}


def test_the_guide_has_queries_of_every_kind():
    assert len(SQL) >= 5 and len(PYTHON) >= 5
    assert any("time_bucket" in q for q in SQL)
    assert any("telemetry_1h" in q for q in SQL)


@pytest.mark.parametrize("query", SQL, ids=[f"sql{n}" for n in range(len(SQL))])
def test_sql_queries_return_rows(data, query):
    with data["warehouse"].connect() as conn:
        rows = conn.execute(query).fetchall()
    assert rows, query


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{n}" for n in range(len(PYTHON))])
def test_python_snippets_read_the_raw_parquet(data, code, monkeypatch):
    s3 = data["s3"]
    monkeypatch.setenv("IOT_LOCAL_STORE_DIR", str(data["local_dir"]))
    monkeypatch.setenv("IOT_OBJECT_STORE", "local")
    monkeypatch.setenv("IOT_S3_ENDPOINT", s3.endpoint)
    monkeypatch.setenv("IOT_S3_BUCKET", "analyst-raw")
    monkeypatch.setenv("IOT_S3_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("IOT_S3_SECRET_KEY", s3.secret_key)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    results = [namespace[name] for name in RESULT_NAMES if name in namespace]
    assert len(results) == 1, "each snippet computes one result"
    assert len(results[0]) > 0
