"""A real Prometheus (Debian's ``prometheus``) with the shipped config and rules scrapes a
real ingest metrics endpoint on loopback: the job finds the target, the daemon's series
arrive under the names the rules use, every rule loads and evaluates, and backpressure on
the endpoint puts IngestBackpressure into the pending state (it fires after its ``for``).

Only the scrape target (the compose service name) and the intervals (seconds instead of
15 s, to finish quickly) differ from deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ingest_daemon.metrics import IngestMetrics, serve
from iot_platform.services.process import ChildProcess, ServiceError, free_port
from tests.unit.test_prometheus_rules import CONFIG, rules
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    return body["data"]


def _value(base: str, query: str) -> float | None:
    result = _api(base, "/api/v1/query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:  # refused, or 503 while the TSDB opens
        return False


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[IngestMetrics, str]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `scripts/bootstrap.sh --dev` installs Debian's package")
    metrics = IngestMetrics()
    endpoint = serve(metrics, "127.0.0.1", 0, lambda: {"healthy": True})
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(CONFIG.parent / pattern) for pattern in config["rule_files"]]
    [ingest] = [job for job in config["scrape_configs"] if job["job_name"] == "ingest"]
    ingest["static_configs"] = [{"targets": [f"127.0.0.1:{endpoint.server_address[1]}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = ChildProcess(
        "prometheus",
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            process.wait_for_port("127.0.0.1", port, timeout=60)
        except ServiceError as exc:
            pytest.fail(f"prometheus did not start: {exc}")
        wait_until("prometheus ready", lambda: _ready(base), timeout=60)
        yield metrics, base
    finally:
        process.stop()
        endpoint.shutdown()
        endpoint.server_close()


def test_prometheus_scrapes_the_daemon_and_evaluates_the_rules(scraped):
    metrics, base = scraped
    metrics.connected.set(1)
    metrics.received.inc(120)
    metrics.batches.labels("store").inc(3)
    wait_until("the ingest target up", lambda: _value(base, 'up{job="ingest"}') == 1.0, 30)
    wait_until("series", lambda: _value(base, "ingest_messages_received_total") == 120.0, 30)
    assert _value(base, 'ingest_batches_written_total{destination="store"}') == 3.0
    assert _value(base, "ingest_connected") == 1.0

    groups = _api(base, "/api/v1/rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {rule["alert"] for rule in rules()}
    wait_until(
        "every rule evaluated",
        lambda: all(
            r["health"] == "ok" and r["lastEvaluation"] > "2000"
            for g in _api(base, "/api/v1/rules")["groups"]
            for r in g["rules"]
        ),
        30,
    )
    assert _api(base, "/api/v1/alerts")["alerts"] == []  # a healthy daemon alerts nothing

    metrics.backpressure.set(1)
    alerts = wait_until(
        "IngestBackpressure pending",
        lambda: [a for a in _api(base, "/api/v1/alerts")["alerts"] if a["state"] == "pending"],
        30,
    )
    assert [a["labels"]["alertname"] for a in alerts] == ["IngestBackpressure"]
    assert alerts[0]["labels"]["severity"] == "critical"
