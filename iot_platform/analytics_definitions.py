"""The analysts' code location (``iot_analytics``): the dbt marts and their schedule.

Why a location of its own: Dagster loads a run's whole code location in the run's own
process, and importing dagster-dbt with dbt-core takes about 2.5 s on a 2-core machine —
more than half of a load run's start-up. The live path starts a load run every few
seconds under load, so the marts live here and the platform location
(``iot_platform.definitions``) stays free of dbt. Lineage is still one graph: the dbt
sources carry the warehouse assets' keys, which the UI joins across locations
(``tests/unit/test_definitions.py`` checks that every source key is defined there).
"""

from __future__ import annotations

import dagster as dg

from iot_platform.defs.assets.dbt import analytics_dbt_models, dbt_build_schedule, dbt_resource
from iot_platform.defs.resources import warehouse_resource

defs = dg.Definitions(
    assets=[analytics_dbt_models],
    schedules=[dbt_build_schedule],
    resources={"dbt": dbt_resource, "warehouse": warehouse_resource()},
    executor=dg.in_process_executor,
)
