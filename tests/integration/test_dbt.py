"""The analysts' dbt project (dbt_models/) run through Dagster on a real warehouse.

Telemetry, events and rejects are loaded by the platform's own loader, the rollups are
refreshed and the health rules evaluated as the pipeline does; then the dbt assets are
materialised with the real dbt and warehouse resources (profile from IOT_PG_*), so
`dbt build` runs every model and test. The marts must equal direct SQL over the
warehouse tables, a broken row must fail its dbt test, and the dbt sources must sit
below the warehouse assets in the one Definitions of the code location.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from iot_platform.health import RULES, HealthSettings, evaluate
from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.warehouse.aggregates import refresh
from iot_platform.warehouse.load import known_devices, load_object, load_parameters
from iot_platform.warehouse.migrations import Dialect, migrate
from tests.warehouse_data import put_batch, telemetry_messages

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DBT_DIR = ROOT / "dbt_models"
DBT = Path(sys.executable).parent / "dbt"

DAY1 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
HEALTH_AT = dt.datetime(2026, 3, 2, 4, 0, tzinfo=dt.UTC)
REGISTERED = ["dbt-a", "dbt-b", "dbt-c"]  # dbt-c never sends anything
ROLLUP_ORDER = ("telemetry_1m", "telemetry_1h", "telemetry_1d")


# ---- setup -----------------------------------------------------------------------------


def ensure_manifest() -> Path:
    """`dbt parse` (as scripts/bootstrap.sh does) when the manifest is missing or older
    than a file of the project; pointed at a closed port to show parse never connects."""
    manifest = DBT_DIR / "target" / "manifest.json"
    sources = [
        p
        for p in DBT_DIR.rglob("*")
        if p.is_file() and p.suffix in {".sql", ".yml"} and "target" not in p.parts
    ]
    newest = max(p.stat().st_mtime for p in sources)
    if not manifest.is_file() or manifest.stat().st_mtime < newest:
        env = {**os.environ, "IOT_PG_HOST": "127.0.0.1", "IOT_PG_PORT": "1"}
        project_args = ["--project-dir", str(DBT_DIR), "--profiles-dir", str(DBT_DIR)]
        subprocess.run(
            [str(DBT), "parse", "--quiet", *project_args],
            env=env,
            check=True,
            timeout=300,
        )
    return manifest


@pytest.fixture(scope="module")
def dbt_module():
    ensure_manifest()
    from iot_platform import analytics_definitions as module  # needs the manifest at import

    return module


def _status(device_id: str, seq: int, ts: dt.datetime, status: str) -> bytes:
    return json.dumps(
        {"v": 2, "device_id": device_id, "ts": ts.isoformat(), "seq": seq}
        | {"msg_type": "status", "status": status}
    ).encode()


def _messages() -> list[tuple[dt.datetime, str, bytes]]:
    # dbt-a: every 10 min from 20:00 on day 1 to 03:50 on day 2 (4 + 4 hours with data);
    # dbt-b: every minute 22:05-22:34 on day 1 (1 hour); rejects from dbt-b and a stranger.
    messages = telemetry_messages(["dbt-a"], DAY1 + dt.timedelta(hours=20), 48, every_s=600)
    messages += telemetry_messages(
        ["dbt-b"], DAY1 + dt.timedelta(hours=22, minutes=5), 30, seed=2, every_s=60
    )
    # dbt-a's last will was registered as it connected, so its ts is before the online
    # message's; it is received at HEALTH_AT: presence is ordered by receive time
    connected = DAY1 + dt.timedelta(hours=20)
    for at, ts, status in (
        (connected, connected, "online"),
        (HEALTH_AT, connected - dt.timedelta(seconds=1), "offline"),
    ):
        messages.append((at, "iot/dbt-a/status", _status("dbt-a", 1000, ts, status)))
    bad_at = DAY1 + dt.timedelta(hours=22, minutes=10)
    messages += [(bad_at, "iot/dbt-b/telemetry", b"{not json") for _ in range(3)]
    messages.append((bad_at, "iot/stranger/telemetry", b"{also not json"))
    return sorted(messages, key=lambda m: m[0])


def seed(conn: psycopg.Connection, store_dir: Path) -> None:
    """Register, load one raw batch through the platform's loader (not autocommit)."""
    conn.execute(
        "INSERT INTO devices (device_id, enrolled_at) SELECT unnest(%s::text[]), %s",
        [REGISTERED, DAY1 - dt.timedelta(days=1)],
    )
    conn.commit()
    store = LocalDirectoryStore(store_dir)
    load_object(
        conn,
        store,
        put_batch(store, _messages(), seq=1),
        run_id="dbt-test",
        parameters=load_parameters(conn),
        devices=known_devices(conn),
        max_payload_bytes=256 * 1024,
    )
    conn.commit()


def refresh_rollups(conn: psycopg.Connection, dialect: Dialect) -> None:
    """Refresh 1m -> 1h -> 1d over the window the loads touched (as the rollup assets do)."""
    lo, hi = conn.execute(
        "SELECT min(refresh_from), max(refresh_to) FROM ingest_batches"
    ).fetchone()
    for name in ROLLUP_ORDER:
        refresh(conn, dialect, name, lo, hi)


def evaluate_health(conn: psycopg.Connection) -> None:
    settings = HealthSettings.from_env()
    for rule in RULES:
        evaluate(conn, rule, settings, HEALTH_AT)
    conn.commit()


def _pg_env(monkeypatch, conninfo: str) -> dict[str, str]:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    env = {
        "IOT_PG_HOST": params["host"],
        "IOT_PG_PORT": str(params["port"]),
        "IOT_PG_USER": params["user"],
        "IOT_PG_PASSWORD": params["password"],
        "IOT_PG_DB": params["dbname"],
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def materialize(dbt_module, instance, *, raise_on_error: bool = True):
    """The dbt assets with the code location's own resources (IOT_PG_* from the env)."""
    from iot_platform.defs.resources import build_resources

    return dg.materialize(
        [dbt_module.analytics_dbt_models],
        resources={"dbt": dbt_module.dbt_resource, "warehouse": build_resources()["warehouse"]},
        instance=instance,
        raise_on_error=raise_on_error,
    )


def checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _rows(conn, query: str, params=None) -> list[tuple]:
    return [tuple(r) for r in conn.execute(query, params or [])]


def _close(a: list[tuple], b: list[tuple]) -> bool:
    def same(x, y):
        if isinstance(x, float) or isinstance(y, float):
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
        return x == y

    return len(a) == len(b) and all(
        len(r) == len(s) and all(same(x, y) for x, y in zip(r, s, strict=True))
        for r, s in zip(a, b, strict=True)
    )


@pytest.fixture
def warehouse(postgres_db, tmp_path, monkeypatch) -> psycopg.Connection:
    _pg_env(monkeypatch, postgres_db)
    with psycopg.connect(postgres_db) as conn:
        assert migrate(conn)[0] is Dialect.POSTGRES
        seed(conn, tmp_path / "objects")
        conn.autocommit = True
        refresh_rollups(conn, Dialect.POSTGRES)
        conn.autocommit = False
        evaluate_health(conn)
        conn.autocommit = True
        yield conn


# ---- PostgreSQL ------------------------------------------------------------------------


def test_marts_equal_direct_sql_and_every_dbt_test_passes(dbt_module, warehouse, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = materialize(dbt_module, instance)
    assert result.success
    # The asset removes the target folder dagster-dbt gave its run (<op>-<run id>-<uuid>).
    left = list((DBT_DIR / "target").glob(f"analytics_dbt_models-{result.run_id[:7]}-*"))
    assert left == []
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {
        "analytics/device_daily_summary",
        "analytics/device_uptime",
        "analytics/device_latest_state",
        "analytics/data_quality_summary",
    }
    evaluations = checks(result)
    assert len(evaluations) >= 25
    assert [n for n, e in evaluations.items() if not e.passed] == []
    conn = warehouse

    # daily summary: the counts and stats of a GROUP BY over raw telemetry
    got = _rows(
        conn,
        """SELECT day, device_id, metric, samples, avg_value, min_value, max_value
           FROM analytics.device_daily_summary ORDER BY 1, 2, 3""",
    )
    expected = _rows(
        conn,
        """SELECT (ts AT TIME ZONE 'UTC')::date, device_id::text, metric::text, count(*),
                  avg(value), min(value), max(value)
           FROM telemetry GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    )
    assert len(got) == 9 and _close(got, expected)  # dbt-a x 2 days + dbt-b, 3 metrics

    # uptime: hours with data per day (0 for a registered device that sent nothing)
    got = _rows(
        conn,
        """SELECT day::text, device_id, hours_with_data, availability
           FROM analytics.device_uptime ORDER BY 1, 2""",
    )
    assert got == [
        ("2026-03-01", "dbt-a", 4, round(4 / 24, 4)),
        ("2026-03-01", "dbt-b", 1, round(1 / 24, 4)),
        ("2026-03-01", "dbt-c", 0, 0.0),
        ("2026-03-02", "dbt-a", 4, round(4 / 24, 4)),
        ("2026-03-02", "dbt-b", 0, 0.0),
        ("2026-03-02", "dbt-c", 0, 0.0),
    ]
    hours_a = conn.execute(
        """SELECT count(DISTINCT date_trunc('hour', ts AT TIME ZONE 'UTC')) FROM telemetry
           WHERE device_id = 'dbt-a' AND ts < '2026-03-02Z'"""
    ).fetchone()[0]
    assert got[0][2] == hours_a

    # latest state: the analyst guide's DISTINCT ON query, plus the last status event
    got = _rows(
        conn,
        """SELECT device_id, metric, last_ts, last_value, unit
           FROM analytics.device_latest_state ORDER BY 1, 2""",
    )
    expected = _rows(
        conn,
        """SELECT DISTINCT ON (device_id, metric) device_id::text, metric::text, ts, value, unit
           FROM telemetry ORDER BY device_id, metric, ts DESC""",
    )
    assert len(got) == 6 and got == expected
    statuses = _rows(
        conn,
        """SELECT DISTINCT device_id, last_status, last_status_at
           FROM analytics.device_latest_state ORDER BY 1""",
    )
    assert statuses == [("dbt-a", "offline", HEALTH_AT), ("dbt-b", None, None)]

    # data quality: rejects by topic device, accepted messages, health rows by status
    got = _rows(
        conn,
        """SELECT day, device_id, is_registered, rejected_messages, accepted_messages,
                  health_evaluations, health_ok + health_warn + health_error
           FROM analytics.data_quality_summary ORDER BY 1, 2""",
    )
    expected = _rows(
        conn,
        """WITH r AS (SELECT (received_at AT TIME ZONE 'UTC')::date AS day,
                             split_part(topic, '/', 2) AS device_id, count(*) AS n
                      FROM decode_rejects GROUP BY 1, 2),
                a AS (SELECT (received_at AT TIME ZONE 'UTC')::date AS day, device_id,
                             count(*) AS n FROM device_messages GROUP BY 1, 2),
                h AS (SELECT (checked_at AT TIME ZONE 'UTC')::date AS day, device_id,
                             count(*) AS n FROM device_health GROUP BY 1, 2),
                k AS (SELECT day, device_id FROM r UNION SELECT day, device_id FROM a
                      UNION SELECT day, device_id FROM h)
           SELECT k.day, k.device_id, k.device_id = ANY(%s), coalesce(r.n, 0),
                  coalesce(a.n, 0), coalesce(h.n, 0), coalesce(h.n, 0)
           FROM k LEFT JOIN r USING (day, device_id) LEFT JOIN a USING (day, device_id)
                  LEFT JOIN h USING (day, device_id)
           ORDER BY 1, 2""",
        [REGISTERED],
    )
    assert got == expected
    by_key = {(r[0].isoformat(), r[1]): r for r in got}
    assert by_key[("2026-03-01", "dbt-b")][3] == 3
    assert by_key[("2026-03-01", "stranger")][2:4] == (False, 1)
    assert by_key[("2026-03-02", "dbt-c")][5] == len([r for r in RULES if r.scope == "device"])
    silent = conn.execute(
        """SELECT worst_health_status, failed_checks FROM analytics.data_quality_summary
           WHERE device_id = 'dbt-c' AND day = '2026-03-02'"""
    ).fetchone()
    assert silent[0] == "warn" and "silent_devices" in silent[1]


def test_the_readme_psql_line_does_not_prompt(dbt_module, warehouse, tmp_path):
    """README "Run by hand": after `export IOT_PG_PASSWORD=...`, psql runs without a
    prompt (stdin closed here: a prompt would fail with "no password supplied")."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert materialize(dbt_module, instance).success
    text = (ROOT / "README.md").read_text()
    start = text.index('PGPASSWORD="$IOT_PG_PASSWORD" psql')
    line = text[start : text.index("LIMIT 20", start) + len('LIMIT 20"')]
    info = warehouse.info
    uri = f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"
    result = subprocess.run(
        ["bash", "-c", line.replace("postgresql://iot@127.0.0.1:54329/iot", uri)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "dbt-a" in result.stdout


def test_a_broken_row_fails_its_dbt_test(dbt_module, warehouse, tmp_path):
    conn = warehouse
    # a health row for a device the registry does not know (health rows are written for
    # registered devices only), and a device clock one month ahead
    conn.execute(
        "INSERT INTO device_health (checked_at, device_id, check_name, status)"
        " VALUES (%s, 'ghost', 'silent_devices', 'warn')",
        [HEALTH_AT],
    )
    ahead = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30)
    conn.execute(
        "INSERT INTO telemetry (ts, device_id, metric, value, unit, batch_id)"
        " VALUES (%s, 'dbt-b', 'voltage_dc', 700, 'V', 0)",
        [ahead],
    )
    for name in ROLLUP_ORDER:
        refresh(conn, Dialect.POSTGRES, name, ahead, ahead)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = materialize(dbt_module, instance, raise_on_error=False)
    assert not result.success  # an ERROR-severity dbt test failed: `dbt build` exits 1
    evaluations = checks(result)
    failed = {n: e for n, e in evaluations.items() if not e.passed}
    relationships = next(n for n in failed if n.startswith("relationships_data_quality_summary"))
    future = next(n for n in failed if n.startswith("accepted_range_device_latest_state_last_ts"))
    assert set(failed) == {relationships, future}
    assert failed[relationships].severity == dg.AssetCheckSeverity.ERROR
    assert failed[relationships].metadata["dagster_dbt/failed_row_count"].value == 1
    assert failed[future].severity == dg.AssetCheckSeverity.WARN
    assert failed[future].metadata["dagster_dbt/failed_row_count"].value == 1
    # the marts were still built; only the data failed its tests
    assert conn.execute(
        "SELECT is_registered FROM analytics.data_quality_summary WHERE device_id = 'ghost'"
    ).fetchone() == (False,)


# ---- Definitions -----------------------------------------------------------------------


def test_dbt_sources_are_the_warehouse_assets_across_the_code_locations(dbt_module):
    from iot_platform.analytics_definitions import defs as analytics
    from iot_platform.definitions import defs as platform

    # The UI's asset graph joins the two code locations by asset key; so does a merge.
    dbt_only = dg.Definitions(assets=analytics.assets, resources={"dbt": dbt_module.dbt_resource})
    graph = dg.Definitions.merge(platform, dbt_only).resolve_asset_graph()

    def parents(model: str) -> set[str]:
        return {
            k.to_user_string() for k in graph.get(dg.AssetKey(["analytics", model])).parent_keys
        }

    assert "warehouse/telemetry_1d" in parents("device_daily_summary")
    assert "warehouse/telemetry_1h" in parents("device_uptime")
    assert {"warehouse/telemetry", "warehouse/device_events"} <= parents("device_latest_state")
    assert {"warehouse/decode_rejects", "warehouse/device_health"} <= parents(
        "data_quality_summary"
    )
    # one graph: the rollup the marts read is the platform's own asset, not a stub
    telemetry_1d = graph.get(dg.AssetKey(["warehouse", "telemetry_1d"]))
    assert telemetry_1d.is_materializable and telemetry_1d.group_name == "aggregates"
    assert not graph.get(dg.AssetKey(["warehouse", "device_health"])).is_materializable
    for model in ("device_daily_summary", "device_uptime", "device_latest_state"):
        assert graph.get(dg.AssetKey(["analytics", model])).group_name == "analytics"
    repo = analytics.get_repository_def()
    assert repo.get_schedule_def("dbt_build_schedule").job_name == "dbt_build_job"
    assert "dbt" in repo.get_top_level_resources()


def test_a_missing_manifest_names_the_command_to_run(dbt_module, tmp_path, monkeypatch):
    from dagster_dbt import DbtProject
    from dagster_dbt.errors import DagsterDbtManifestNotFoundError

    monkeypatch.delenv("DAGSTER_IS_DEV_CLI", raising=False)
    copy = tmp_path / "dbt_models"
    shutil.copytree(DBT_DIR, copy, ignore=shutil.ignore_patterns("target", "logs"))
    project = DbtProject(project_dir=copy, profiles_dir=copy)
    with pytest.raises(DagsterDbtManifestNotFoundError, match="dbt parse") as raised:
        dbt_module.prepared_manifest(project)
    assert "scripts/bootstrap.sh" in str(raised.value)


# ---- TimescaleDB double ----------------------------------------------------------------


def test_the_same_models_build_on_the_timescale_double(
    dbt_module, timescaledb, tmp_path, monkeypatch
):
    """Same models, TimescaleDB dialect (hypertable + continuous aggregates). The double
    is one shared session: the warehouse goes into a schema of its own, dropped after."""
    with timescaledb.schema("wh", companions=("analytics",)) as (conn, schema):
        marts = f"{schema}_analytics"
        assert migrate(conn)[0] is Dialect.TIMESCALE
        seed(conn, tmp_path / "objects")
        conn.autocommit = True
        refresh_rollups(conn, Dialect.TIMESCALE)
        conn.autocommit = False
        evaluate_health(conn)
        conn.autocommit = True

        _pg_env(monkeypatch, timescaledb.conninfo)
        # dbt qualifies relations with the profile's dbname; PGlite serves any dbname
        # from its one database, whose current_database() is `template1`.
        monkeypatch.setenv("IOT_PG_DB", conn.execute("SELECT current_database()").fetchone()[0])
        monkeypatch.setenv("IOT_DBT_SOURCE_SCHEMA", schema)
        monkeypatch.setenv("IOT_DBT_TARGET_SCHEMA", marts)
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            result = materialize(dbt_module, instance, raise_on_error=False)
        failed = [n for n, e in checks(result).items() if not e.passed]
        assert result.success, failed
        assert failed == []

        got = _rows(
            conn,
            sql.SQL(
                "SELECT day, device_id, metric, samples FROM {}.device_daily_summary"
                " ORDER BY 1, 2, 3"
            ).format(sql.Identifier(marts)),
        )
        expected = _rows(
            conn,
            """SELECT (ts AT TIME ZONE 'UTC')::date, device_id::text, metric::text,
                      count(*) FROM telemetry GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
        )
        assert len(got) == 9 and got == expected
        uptime = _rows(
            conn,
            sql.SQL(
                "SELECT day::text, device_id, hours_with_data FROM {}.device_uptime"
                " WHERE hours_with_data > 0 ORDER BY 1, 2"
            ).format(sql.Identifier(marts)),
        )
        assert uptime == [
            ("2026-03-01", "dbt-a", 4),
            ("2026-03-01", "dbt-b", 1),
            ("2026-03-02", "dbt-a", 4),
        ]
        latest = _rows(
            conn,
            sql.SQL(
                "SELECT device_id, metric, last_ts, last_value, last_status"
                " FROM {}.device_latest_state ORDER BY 1, 2"
            ).format(sql.Identifier(marts)),
        )
        expected = _rows(
            conn,
            """SELECT DISTINCT ON (device_id, metric) device_id::text, metric::text, ts,
                      value, CASE device_id WHEN 'dbt-a' THEN 'offline' END
               FROM telemetry ORDER BY device_id, metric, ts DESC""",
        )
        assert len(latest) == 6 and latest == expected
