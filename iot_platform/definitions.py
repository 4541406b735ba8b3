"""The platform's Dagster code location (``iot_platform``, see ``workspace.yaml``): ingest,
warehouse, health and PKI, autoloaded from ``iot_platform/defs/`` (one package per domain).

Every asset, check, job, schedule and sensor at module scope under ``iot_platform/defs/`` is
part of the location; a new module needs no registration here. The walk is
``dg.load_definitions_from_package_module``, not ``dg.load_from_defs_folder``: the latter
builds Dagster's component tree, which loads every installed component plugin — dagster-dbt
among them — and so would put dbt's ~2.5 s import back into every load run's start-up.
``dg check defs`` / ``dg list defs`` load this module (``[tool.dg.project]`` in
pyproject.toml).

The analysts' dbt marts are the ``iot_analytics`` location
(``iot_platform.analytics_definitions``), so load runs never import dbt.
"""

import warnings

import dagster as dg

from iot_platform import defs as platform_defs
from iot_platform.defs.resources import build_resources

with warnings.catch_warnings():
    # The package walk is a "preview" API in Dagster 1.13 (a warning on every import, so in
    # every run's log). dagster is pinned exactly (pyproject.toml), and the definitions
    # snapshot test fails on any change in what it loads.
    warnings.simplefilter("ignore", dg.PreviewWarning)
    defs = dg.load_definitions_from_package_module(
        platform_defs,
        resources=build_resources(),
        # One process per run, not per step: on a small machine a subprocess per step (each
        # importing Dagster, Polars and the definitions) was most of the publish->query delay.
        executor=dg.in_process_executor,
    )
