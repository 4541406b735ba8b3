"""The code locations load as the webserver loads them, and the instance config parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_load_with_every_resource():
    from iot_platform.analytics_definitions import defs as analytics
    from iot_platform.definitions import defs

    assert isinstance(defs, dg.Definitions)
    repo = defs.get_repository_def()
    assert set(repo.get_top_level_resources()) >= {"warehouse", "pki", "broker"}
    assert set(analytics.get_repository_def().get_top_level_resources()) >= {"dbt", "warehouse"}


# Warehouse tables the platform writes with no asset of its own: dbt's sources make them
# external assets in the analytics location.
EXTERNAL_TABLES = {"devices", "device_health", "decode_rejects", "device_messages"}


def test_the_platform_location_never_imports_dbt():
    """Each load run imports its code location; dbt would add ~2.5 s to every run."""
    probe = (
        "import sys, iot_platform.definitions; print(any(m.startswith('dbt') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "False"


def test_dbt_sources_are_the_platform_locations_assets():
    """One lineage graph across the two locations: every dbt source key is an asset of
    the platform location (or one of the external tables), so the marts hang below it."""
    from iot_platform.analytics_definitions import defs as analytics
    from iot_platform.definitions import defs as platform

    (dbt_assets,) = [a for a in analytics.assets if isinstance(a, dg.AssetsDefinition)]
    sources = set(dbt_assets.dependency_keys) - set(dbt_assets.keys)
    platform_keys = set(platform.resolve_asset_graph().get_all_asset_keys())
    external = {dg.AssetKey(["warehouse", name]) for name in EXTERNAL_TABLES}
    assert sources - external <= platform_keys
    assert {
        dg.AssetKey(["warehouse", "telemetry_1h"]),
        dg.AssetKey(["warehouse", "telemetry"]),
    } <= (sources & platform_keys)


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
    for location in ("iot_platform", "iot_analytics"):
        assert f"Validation successful for code location {location}" in (
            result.stdout + result.stderr
        )


def test_instance_config_is_valid_and_reads_storage_from_env(tmp_path, monkeypatch):
    """Parse dagster.yaml with Dagster's own schema (no database needed)."""
    from dagster._core.instance.ref import InstanceRef

    config = yaml.safe_load((ROOT / "deploy" / "dagster" / "dagster.yaml").read_text())
    storage = config["storage"]["custom"]  # dagster_postgres' settings, kept connections
    assert (storage["module"], storage["class"]) == (
        "iot_platform.dagster_storage",
        "PooledPostgresStorage",
    )
    pg = storage["config"]["postgres_db"]
    assert {v["env"] for v in pg.values()} == {
        "IOT_PG_HOST",
        "IOT_PG_PORT",
        "IOT_PG_USER",
        "IOT_PG_PASSWORD",
        "IOT_DAGSTER_DB",
    }
    (tmp_path / "dagster.yaml").write_text(
        (ROOT / "deploy" / "dagster" / "dagster.yaml").read_text()
    )
    for name in ("IOT_PG_HOST", "IOT_PG_USER", "IOT_PG_PASSWORD", "IOT_DAGSTER_DB"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("IOT_PG_PORT", "5432")
    ref = InstanceRef.from_dir(str(tmp_path))
    coordinator = ref.run_coordinator  # rehydrating validates its config, as the daemon does
    assert type(coordinator).__name__ == "QueuedRunCoordinator"
    assert ref.storage_data.class_name == "PooledPostgresStorage"
