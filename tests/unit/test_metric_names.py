"""The ingest daemon's metrics follow Prometheus naming conventions, and the standard
process metrics are exported (dashboards and alert rules rely on both)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ingest_daemon.metrics import IngestMetrics

UNITS = ("bytes", "seconds")


def families() -> dict[str, str]:
    metrics = IngestMetrics()
    metrics.bytes_written.labels("store").inc(1)
    metrics.batches.labels("store").inc(1)
    text = metrics.render().decode()
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_ingest_metrics_are_named_by_convention():
    ingest = {
        name: kind
        for name, kind in families().items()
        # <counter>_created is the client's creation timestamp of each counter, not a metric
        if name.startswith("ingest_") and not name.endswith("_created")
    }
    assert ingest, "no ingest_* metrics exported"
    for name, kind in ingest.items():
        words = name.split("_")
        for unit in UNITS:
            if unit in words:  # a unit is the last word: ingest_written_bytes, not _bytes_written
                assert words[-1] == unit, name
        if kind == "histogram":
            assert words[-1] in UNITS, f"{name}: a histogram names its unit"
    # the parser strips a counter's _total suffix: the exposed series is <name>_total
    assert ingest["ingest_written_bytes"] == "counter"


def test_the_process_collector_is_registered():
    names = families()
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(names)
