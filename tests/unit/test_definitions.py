"""The code location loads as the webserver loads it, and the instance config parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_with_every_resource():
    from iot_platform.definitions import defs

    assert isinstance(defs, dg.Definitions)
    repo = defs.get_repository_def()
    assert set(repo.get_top_level_resources()) >= {"warehouse", "pki", "broker"}


def test_dagster_definitions_validate_passes(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location iot_platform" in result.stdout + result.stderr


def test_instance_config_is_valid_and_reads_storage_from_env(tmp_path, monkeypatch):
    """Parse dagster.yaml with Dagster's own schema (no database needed)."""
    from dagster._core.instance.ref import InstanceRef

    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    pg = config["storage"]["postgres"]["postgres_db"]
    assert {v["env"] for v in pg.values()} == {
        "IOT_PG_HOST",
        "IOT_PG_PORT",
        "IOT_PG_USER",
        "IOT_PG_PASSWORD",
        "IOT_DAGSTER_DB",
    }
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    for name in ("IOT_PG_HOST", "IOT_PG_USER", "IOT_PG_PASSWORD", "IOT_DAGSTER_DB"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("IOT_PG_PORT", "5432")
    ref = InstanceRef.from_dir(str(tmp_path))
    coordinator = ref.run_coordinator  # rehydrating validates its config, as the daemon does
    assert type(coordinator).__name__ == "QueuedRunCoordinator"
    assert ref.storage_data.class_name == "DagsterPostgresStorage"
