"""Grafana provisioning (deploy/grafana/): the dashboard files are valid and stable.

Uids are pinned here (links and bookmarks depend on them), every datasource a panel or
variable uses is provisioned, every panel has queries, Prometheus queries name metrics the
ingest daemon exports, and the macro emulation used by the query test
(tests/integration/test_dashboard_queries.py) matches Grafana's own output.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
import yaml

from tests.grafana import (
    GRAFANA_DIR,
    SQL_TYPES,
    dashboards,
    datasources,
    interpolate,
    sql_queries,
)
from tests.unit.test_prometheus_rules import PROMETHEUS_OWN, exported_series, metric_names

STABLE_UIDS = {
    "fleet.json": "iot-fleet",
    "device.json": "iot-device",
    "pipeline.json": "iot-pipeline",
}
FOLDER_UID = "iot-platform"


def _datasource_uids(board: dict) -> list[tuple[str, dict]]:
    found = []
    for variable in board.get("templating", {}).get("list", []):
        if "datasource" in variable:
            found.append((f"variable {variable['name']}", variable["datasource"]))
    for panel in board["panels"]:
        found.append((panel["title"], panel["datasource"]))
        found += [(f"{panel['title']} {t['refId']}", t["datasource"]) for t in panel["targets"]]
    return found


def test_dashboards_have_their_stable_uids_and_titles():
    boards = dashboards()
    assert {name: b["uid"] for name, b in boards.items()} == STABLE_UIDS
    assert len({b["title"] for b in boards.values()}) == len(boards)
    for board in boards.values():
        assert "id" not in board or board["id"] is None, "a provisioned dashboard has no id"
        assert board["schemaVersion"] >= 36 and board["time"]["from"].startswith("now-")


def test_every_datasource_used_is_provisioned_with_its_type():
    provisioned = datasources()
    assert set(provisioned) == {"iot-warehouse", "iot-prometheus"}
    for name, board in dashboards().items():
        for where, ref in _datasource_uids(board):
            assert ref["uid"] in provisioned, f"{name} / {where}: unknown datasource {ref}"
            assert ref["type"] == provisioned[ref["uid"]]["type"], f"{name} / {where}"


def test_panels_have_queries_ids_and_do_not_overlap():
    for name, board in dashboards().items():
        panels = board["panels"]
        assert panels, name
        assert len({p["id"] for p in panels}) == len(panels), f"{name}: duplicate panel ids"
        for panel in panels:
            assert panel["targets"], f"{name} / {panel['title']}: no query"
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
            for target in panel["targets"]:
                if target["datasource"]["type"] in SQL_TYPES:
                    assert target["rawQuery"] and target["rawSql"].strip(), panel["title"]
                    assert target["format"] in {"table", "time_series"}, panel["title"]
                else:
                    assert target["expr"].strip(), panel["title"]
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name} / {panel['title']} is wider than the grid"
        for a, b in itertools.combinations(panels, 2):
            pa, pb = a["gridPos"], b["gridPos"]
            apart = (
                pa["x"] + pa["w"] <= pb["x"]
                or pb["x"] + pb["w"] <= pa["x"]
                or pa["y"] + pa["h"] <= pb["y"]
                or pb["y"] + pb["h"] <= pa["y"]
            )
            assert apart, f"{name}: {a['title']!r} overlaps {b['title']!r}"


def test_prometheus_panels_name_exported_metrics():
    exported = exported_series() | PROMETHEUS_OWN
    seen = set()
    for board in dashboards().values():
        for panel in board["panels"]:
            for target in panel["targets"]:
                if "expr" in target:
                    names = metric_names(target["expr"])
                    assert names and names <= exported, (panel["title"], names - exported)
                    seen |= names
    assert {"ingest_pending_acks", "ingest_spool_bytes", "ingest_upload_seconds_bucket"} <= seen


def test_the_pipeline_issue_panels_exist():
    titles = {name: {p["title"] for p in b["panels"]} for name, b in dashboards().items()}
    assert {"Messages per minute", "Rejects per minute by reason"} <= titles["fleet.json"]
    assert "Certificate expiry ahead" in titles["fleet.json"]
    assert {"Metrics (rollup chosen by zoom)", "Events", "Health history"} <= titles["device.json"]
    assert {"Publish to queryable lag", "Load runs", "Pending acks"} <= titles["pipeline.json"]
    device_sql = " ".join(q.sql for q in sql_queries() if q.where.startswith("device.json"))
    for table in ("telemetry", "telemetry_1m", "telemetry_1h", "telemetry_1d", "device_events"):
        assert f"FROM {table}\n" in device_sql + "\n", table


def test_the_provider_serves_the_dashboards_folder_with_a_fixed_uid():
    config = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "iot.yml").read_text())
    [provider] = config["providers"]
    assert provider["folderUid"] == FOLDER_UID and provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((GRAFANA_DIR.parents[1] / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes


# ---- the macro emulation the query test relies on (expected strings from Grafana) ----

START = dt.datetime(2018, 4, 12, 18, 0, tzinfo=dt.UTC)
END = dt.datetime(2018, 4, 12, 18, 5, 0, 500_000, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("query", "timescaledb", "expected"),
    [
        (
            "WHERE $__timeFilter(time_column)",
            False,
            "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00.5Z'",
        ),
        (
            "GROUP BY $__timeGroup(time_column,'5m')",
            False,
            "GROUP BY floor(extract(epoch from time_column)/300)*300",
        ),
        ("SELECT $__timeGroupAlias(t, '1m')", True, "SELECT time_bucket('60.000s',t) AS \"time\""),
        (
            "SELECT $__timeFrom(), $__timeTo()",
            False,
            "SELECT '2018-04-12T18:00:00Z', '2018-04-12T18:05:00.5Z'",
        ),
        ("WHERE id = ${device:sqlstring}", False, "WHERE id = 'it''s'"),
    ],
)
def test_interpolation_matches_grafana(query, timescaledb, expected):
    got = interpolate(
        query, start=START, end=END, timescaledb=timescaledb, variables={"device": "it's"}
    )
    assert got == expected


def test_unknown_macros_and_variables_fail():
    with pytest.raises(ValueError, match="not emulated"):
        interpolate("$__unknown(x)", start=START, end=END, timescaledb=False)
    with pytest.raises(KeyError):
        interpolate("$nope", start=START, end=END, timescaledb=False)
