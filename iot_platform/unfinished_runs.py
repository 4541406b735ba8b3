"""Runs that an earlier ``iot-platform up`` left in progress: end them at the next start.

In the embedded stack every run worker is a child of a code server that ``up`` started, so
when ``up`` stops, its runs stop with it — but their records stay STARTED (the default run
launcher cannot tell a dead worker from a live one). A load run left so held its hour for
ever: the raw batch sensor allows one load run in flight per hour, so nothing more of that
hour was loaded after a restart. ``up`` runs this module before it starts the code servers
and the daemon: such runs are marked failed (canceled, if they were being canceled), and
Dagster's run retries pick the load runs up again (``dagster/max_retries``; the ledger makes
a reload idempotent).

    python -m iot_platform.unfinished_runs   # with DAGSTER_HOME and the IOT_PG_* settings
"""

from __future__ import annotations

import dagster as dg

UNFINISHED = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
REASON = (
    "iot-platform up stopped while this run was in progress, and its run worker stopped "
    "with it; marked at the next start"
)


def end_unfinished_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark every run that is still starting, running or canceling as ended; returns
    their ids. Only for an instance none of whose run workers can be alive."""
    ended = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        if run.status is dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, REASON)
        else:
            instance.report_run_failed(run, REASON)
        ended.append(run.run_id)
    return ended


def main() -> None:
    with dg.DagsterInstance.get() as instance:
        for run_id in end_unfinished_runs(instance):
            print(f"run {run_id} was left in progress by the last stop: marked ended")


if __name__ == "__main__":
    main()
