"""Runs a stopped embedded stack left in progress are ended at the next start."""

from __future__ import annotations

import dagster as dg

from iot_platform.unfinished_runs import end_unfinished_runs


@dg.op
def _noop() -> None:
    pass


@dg.job
def _job() -> None:
    _noop()


def test_runs_left_starting_running_or_canceling_are_ended_and_the_rest_left_alone() -> None:
    status = dg.DagsterRunStatus
    with dg.instance_for_test() as instance:
        runs = {
            s: instance.create_run_for_job(_job, status=s).run_id
            for s in (status.STARTING, status.STARTED, status.CANCELING, status.NOT_STARTED)
        }
        done = instance.create_run_for_job(_job, status=status.SUCCESS).run_id

        ended = end_unfinished_runs(instance)

        assert sorted(ended) == sorted(
            runs[s] for s in (status.STARTING, status.STARTED, status.CANCELING)
        )

        def now(run_id: str) -> dg.DagsterRunStatus:
            run = instance.get_run_by_id(run_id)
            assert run is not None
            return run.status

        assert now(runs[status.STARTING]) is status.FAILURE
        assert now(runs[status.STARTED]) is status.FAILURE
        assert now(runs[status.CANCELING]) is status.CANCELED
        # created but never submitted: the sensor daemon submits it at its next tick
        assert now(runs[status.NOT_STARTED]) is status.NOT_STARTED
        assert now(done) is status.SUCCESS
        assert end_unfinished_runs(instance) == []  # a second start finds nothing left
