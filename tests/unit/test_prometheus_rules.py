"""Prometheus config and alert rules (deploy/prometheus/): they parse, every metric an
expression names is one the ingest daemon exports (from its registry, not a list kept here),
the scrape target is the compose ingest service, and promtool checks the files and runs
the rules' unit tests (deploy/prometheus/tests/) on synthetic series."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ingest_daemon.metrics import IngestMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
PROMETHEUS_OWN = {"up"}  # series Prometheus itself records for every target

# PromQL words that look like metric names but are not.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left"}
KEYWORDS |= {"group_right", "bool", "offset", "inf", "nan"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def exported_series() -> set[str]:
    """Every sample name the daemon's registry can expose, labelled children or not."""
    names = set()
    for family in IngestMetrics().registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names/values (inside ``{}``), grouping labels or range/offset durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        found.add(word)
    return found


def rules() -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_the_name_extraction_sees_metrics_not_syntax():
    expr = (
        'sum by (job, instance) (increase(a_total{destination="store"}[10m]) or up{job="x"} * 0)'
        " == 0 and on (job) b > 0"
    )
    assert metric_names(expr) == {"a_total", "up", "b"}


def test_config_loads_the_rule_files_and_scrapes_the_ingest_service():
    config = yaml.safe_load(CONFIG.read_text())
    matched = {p for pattern in config["rule_files"] for p in CONFIG.parent.glob(pattern)}
    assert RULE_FILES and matched == set(RULE_FILES)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["ingest"]["static_configs"] for t in sc["targets"]]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    env = compose["ingest"]["environment"]
    assert targets == [f"ingest:{env['INGEST_METRICS_PORT']}"]
    prometheus = compose["prometheus"]
    assert any(
        str(v).startswith("./deploy/prometheus:/etc/prometheus") for v in prometheus["volumes"]
    )


def test_every_rule_is_complete_and_names_only_exported_metrics():
    exported = exported_series() | PROMETHEUS_OWN
    assert {"ingest_connected", "ingest_batches_written_total"} <= exported
    found = {rule["alert"]: rule for rule in rules()}
    wanted = {"IngestDisconnected", "IngestSpoolGrowing", "IngestBackpressure"}
    assert wanted | {"IngestNoBatchesUploaded"} <= set(found)
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        names = metric_names(rule["expr"])
        assert names, name
        unknown = names - exported
        assert not unknown, (
            f"{name} names {unknown}, which ingest_daemon/metrics.py does not export"
        )


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: `scripts/bootstrap.sh --dev` installs Debian's prometheus")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS_DIR
    )


def test_promtool_accepts_the_config_and_rules():
    checked = _promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(RULE_FILES)} rule files found" in checked.stdout


def test_promtool_unit_tests_fire_each_alert_on_its_series():
    assert RULE_TESTS
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a promtool test"
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
