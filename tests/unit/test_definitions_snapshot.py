"""A snapshot of both code locations' definitions, so a lineage break fails with a diff.

What is recorded is what an operator sees in the UI: every asset key with its group,
partitions and upstream keys; every asset check (and whether it blocks); every job with
the assets it selects; schedules with their cron and job; sensors with their jobs. An
accidental change — a dbt source losing its ``meta.dagster.asset_key``, a job selecting
one asset fewer, a check turning blocking — shows as a readable unified diff.

After a deliberate change, re-record and review the diff in git:

    IOT_UPDATE_SNAPSHOT=1 .venv/bin/pytest tests/unit/test_definitions_snapshot.py
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import dagster as dg

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def describe(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "external": not node.is_materializable,
            "partitions": type(partitions).__name__ if partitions else None,
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
        }
    checks = {
        f"{check_key.asset_key.to_user_string()}:{check_key.name}": {
            "blocking": graph.get_check_spec(check_key).blocking
        }
        for check_key in sorted(graph.asset_check_keys, key=str)
    }
    jobs = {}
    for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue  # Dagster's implicit asset job
        job_graph = job.asset_layer.asset_graph  # the job's own selection
        jobs[job.name] = {
            "assets": sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            "checks": sorted(check.name for check in job_graph.asset_check_keys),
            "tags": dict(sorted(job.tags.items())),
        }
    repo = defs.get_repository_def()
    schedules = {
        s.name: {"cron": s.cron_schedule, "job": s.job_name, "default": s.default_status.value}
        for s in sorted(repo.schedule_defs, key=lambda s: s.name)
    }
    sensors = {
        s.name: {
            "jobs": sorted(j.name for j in s.jobs) if s.has_jobs else [],
            "default": s.default_status.value,
        }
        for s in sorted(repo.sensor_defs, key=lambda s: s.name)
    }
    return {
        "assets": assets,
        "checks": checks,
        "jobs": jobs,
        "schedules": schedules,
        "sensors": sensors,
    }


def test_definitions_match_the_snapshot():
    from iot_platform.analytics_definitions import defs as analytics
    from iot_platform.definitions import defs as platform

    current = {"iot_platform": describe(platform), "iot_analytics": describe(analytics)}
    text = json.dumps(current, indent=2, sort_keys=True) + "\n"
    if os.environ.get("IOT_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(text)
    recorded = SNAPSHOT.read_text() if SNAPSHOT.is_file() else ""
    diff = "".join(
        difflib.unified_diff(
            recorded.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=str(SNAPSHOT.relative_to(Path(__file__).parents[2])),
            tofile="current definitions",
        )
    )
    assert not diff, (
        "The definitions changed. If on purpose, re-record with IOT_UPDATE_SNAPSHOT=1 "
        f"(see this test's docstring) and commit the snapshot:\n{diff}"
    )
