"""The analysts' code location (``iot_analytics``): the dbt marts and their schedule.

Why a location of its own: Dagster loads a run's whole code location in the run's own
process, and importing dagster-dbt with dbt-core takes about 2.5 s on a 2-core machine —
more than half of a load run's start-up. The live path starts a load run every few
seconds under load, so the marts live here and the platform location
(``iot_platform.definitions``) stays free of dbt. Lineage is still one graph: the dbt
sources carry the warehouse assets' keys, which the UI joins across locations
(``tests/unit/test_definitions.py`` checks that every source key is defined there).

The analysts' dbt project (``dbt_models/``) as Dagster assets, in group ``analytics``.

The dbt sources carry the warehouse tables' asset keys (``meta.dagster.asset_key`` in
``dbt_models/models/sources.yml``), so the marts hang below ``warehouse/telemetry_1d``
and friends: one lineage graph from the raw batches to the marts. Tables the platform
writes without an asset of its own (``devices``, ``device_health``, ``decode_rejects``,
``device_messages``) appear as external assets under ``warehouse/``. Each dbt test is an
asset check on its model.

The manifest is made at setup time, never while the code location loads:
``scripts/bootstrap.sh`` runs ``dbt parse`` (no database connection needed), which
writes ``dbt_models/target/manifest.json``. Without it, loading fails with a message
naming that command. Under ``dagster dev`` it is re-parsed on load (like dagster-dbt's
``prepare_if_dev``), so model edits show up without a manual step.

Refresh: ``dbt_build_schedule`` runs ``dbt build`` (models, then their tests) every hour
at minute 20. The marts are tables over the rollups, which the sensor-driven loads keep
current within minutes, and over the health history written every 2 minutes; an hourly
rebuild is cheap (the marts read the rollups, not raw telemetry) and easy to reason
about. An eager automation condition was not used: the dbt assets depend on every
partition of the hourly-partitioned rollups, and eager waits while any upstream
partition is missing, which for a partition set starting in 2025 is always.
"""

import os
import shutil
import sys
from pathlib import Path

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets
from dagster_dbt.errors import DagsterDbtManifestNotFoundError

from iot_platform.defs.resources import WarehouseResource, warehouse_resource

DBT_PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt_models"
PREPARE_COMMAND = ".venv/bin/dbt parse --project-dir dbt_models --profiles-dir dbt_models"
GROUP = "analytics"

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def _dbt_executable() -> str:
    """The dbt installed next to this Python (the venv's), else ``dbt`` on the PATH."""
    candidate = Path(sys.executable).parent / "dbt"
    return str(candidate) if candidate.is_file() else "dbt"


def prepared_manifest(project: DbtProject) -> Path:
    """The project's manifest.json, or a clear error saying how to make it.

    Under ``dagster dev`` it is re-made first, as dagster-dbt's ``prepare_if_dev`` does
    (``dbt parse``, no database connection), but with the venv's dbt: ``prepare_if_dev``
    insists on a ``dbt`` on the PATH, which an un-activated venv does not provide.
    Everywhere else the manifest must come from setup.
    """
    if os.environ.get("DAGSTER_IS_DEV_CLI"):
        DbtCliResource(project_dir=project, dbt_executable=_dbt_executable()).cli(
            ["parse", "--quiet"], target_path=project.target_path
        ).wait()
    if not project.manifest_path.is_file():
        raise DagsterDbtManifestNotFoundError(
            f"dbt manifest not found at {project.manifest_path}: the dbt project is parsed "
            "at setup time, not when the code location loads. Run `scripts/bootstrap.sh` "
            f"or `{PREPARE_COMMAND}` (no database needed) in the repository root, then "
            "reload the code location."
        )
    return project.manifest_path


class AnalyticsTranslator(DagsterDbtTranslator):
    """Models become ``analytics/<model>`` in group ``analytics``; sources keep the asset
    key from their ``meta.dagster.asset_key`` (the warehouse tables' keys)."""

    def get_asset_key(self, dbt_resource_props) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            return super().get_asset_key(dbt_resource_props)
        return dg.AssetKey([GROUP, dbt_resource_props["name"]])

    def get_group_name(self, dbt_resource_props) -> str | None:
        return GROUP


@dbt_assets(
    manifest=prepared_manifest(dbt_project),
    project=dbt_project,
    dagster_dbt_translator=AnalyticsTranslator(),
    name="analytics_dbt_models",
)
def analytics_dbt_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource
):
    """``dbt build`` of the selected marts: each model, then its tests (asset checks)."""
    warehouse.dialect()  # a fresh warehouse is migrated first: the sources must exist
    invocation = dbt.cli(["build"], context=context)
    try:
        yield from invocation.stream()
    finally:
        # dagster-dbt gives every run a target folder of its own (dbt_models/target/
        # <op>-<run>-<id>); results and logs are in the run's events, so do not let one
        # folder per hour pile up.
        shutil.rmtree(invocation.target_path, ignore_errors=True)


# The profile (dbt_models/profiles.yml) reads IOT_PG_HOST/PORT/USER/PASSWORD/DB from the
# environment, like the warehouse resource: dbt and the platform use the same database.
dbt_resource = DbtCliResource(project_dir=dbt_project, dbt_executable=_dbt_executable())

dbt_build_job = dg.define_asset_job(
    "dbt_build_job",
    selection=dg.AssetSelection.assets(analytics_dbt_models),
    description="dbt build of the analysts' marts (models and their tests).",
)

dbt_build_schedule = dg.ScheduleDefinition(
    name="dbt_build_schedule",
    job=dbt_build_job,
    cron_schedule="20 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly at :20: rebuild the marts from the rollups and the health history.",
)

defs = dg.Definitions(
    assets=[analytics_dbt_models],
    schedules=[dbt_build_schedule],
    resources={"dbt": dbt_resource, "warehouse": warehouse_resource()},
    executor=dg.in_process_executor,
)
