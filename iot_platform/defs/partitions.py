"""Receive-hour partitions, matching the raw batch keys' ``date=/hour=`` (DESIGN §5, §7),
and which of them have a run in flight (the load and compaction sensors ask)."""

import datetime as dt

import dagster as dg

# end_offset=1: the current, still-filling hour is a valid partition, so the sensor can
# load batches seconds after they land instead of waiting for the hour to close.
hourly_partitions = dg.HourlyPartitionsDefinition(
    start_date="2025-01-01-00:00", timezone="UTC", end_offset=1
)

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def partition_start(partition_key: str) -> dt.datetime:
    """The first instant of an hourly partition (``2026-03-01-12:00``)."""
    return dt.datetime.strptime(partition_key, "%Y-%m-%d-%H:%M").replace(tzinfo=dt.UTC)


def partitions_in_flight(
    instance: dg.DagsterInstance, job_name: str, asset_key: dg.AssetKey
) -> set[str]:
    """Hours with a run of ``job_name``, or any run materialising ``asset_key`` (a backfill,
    a manual run, a retry), queued or running."""
    runs = [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT))]
    return {
        run.tags["dagster/partition"]
        for run in runs
        if "dagster/partition" in run.tags
        and (run.job_name == job_name or asset_key in (run.asset_selection or ()))
    }
