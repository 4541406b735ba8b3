"""The single Dagster code location of the platform (see ``workspace.yaml``)."""

from __future__ import annotations

import dagster as dg

from iot_platform.defs.resources import build_resources

defs = dg.Definitions(resources=build_resources())
