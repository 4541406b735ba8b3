"""Launch the platform's Dagster jobs through the webserver's GraphQL API, as the Launchpad does.

The operator CLI (`iot-platform devices ...`) uses this, so scripted enrollment runs the
same job, with the same validation, audit and run history, as a launch from the UI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import requests

from iot_platform.services.process import PROGRESS_EVERY_S, ServiceError
from iot_platform.settings import PlatformSettings, Secret, dagster_auth_header


class RunStatus(StrEnum):
    """A run's status as the webserver's GraphQL API reports it (Dagster's RunStatus)."""

    QUEUED = "QUEUED"
    NOT_STARTED = "NOT_STARTED"
    MANAGED = "MANAGED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"


TERMINAL = {RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED}

_RUN_EVENTS = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent {
          stepKey
          error { message errorChain { error { message } } }
        }
        ... on RunFailureEvent { message }
        ... on MaterializationEvent {
          metadataEntries {
            label
            ... on TextMetadataEntry { text }
            ... on PathMetadataEntry { path }
            ... on JsonMetadataEntry { jsonString }
          }
        }
      }
    }
  }
}
"""


# The launcher speaks the webserver's GraphQL API directly (as the UI does) rather than
# through dagster-graphql's client, which imports all of Dagster: 2 s on every CLI call.
_JOB_LOCATIONS = """
query JobLocations {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
    ... on Error { message }
  }
}
"""

_LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""

_RUN_STATUS = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}
"""

_LAUNCH_BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""

_BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on Error { message }
  }
}
"""


class LaunchError(ServiceError):
    """The job could not be launched or followed (webserver down, unknown job, bad config)."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: RunStatus
    errors: list[str]
    url: str
    # text, path and JSON metadata of each materialization the run reported, in order: what the
    # run itself says it did (e.g. where it wrote a certificate), no second source to ask
    materializations: list[dict[str, str]] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.SUCCESS


def run_errors(events: list[dict[str, Any]]) -> list[str]:
    """Step failure messages first (they carry the operator-facing reason), each with the
    exception that caused it: an unexpected error inside an op reaches the event log as
    DagsterExecutionStepExecutionError, whose own message names only the op."""
    steps = []
    for event in events:
        error = event.get("error")
        if not error:
            continue
        chain = [error["message"].strip()]
        chain += [link["error"]["message"].strip() for link in error.get("errorChain", [])]
        steps.append(" <- caused by: ".join(chain))
    runs = [e["message"] for e in events if e["__typename"] == "RunFailureEvent"]
    return steps or runs


def materializations(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """label -> value of each materialization's text, path and JSON metadata entries (each
    entry carries exactly one of these fields, per the query's fragments)."""
    return [
        {
            entry["label"]: value
            for entry in event["metadataEntries"]
            for field_name, value in entry.items()
            if field_name in {"text", "path", "jsonString"}
        }
        for event in events
        if event["__typename"] == "MaterializationEvent"
    ]


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class JobLauncher:
    """Submit a job run and wait for its end, reporting the step errors an operator needs.

    ``auth_header`` is the ``Authorization`` value for an authenticating proxy in front of
    the webserver (docs/kubernetes.md); it is sent with every request and never printed."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 300,
        auth_header: Secret | None = None,
    ) -> None:
        # Kept whole, never split and rebuilt: an IPv6 literal (http://[::1]:3000) or a
        # path prefix behind a proxy survive as the operator wrote them.
        url = urlsplit(base_url)
        if auth_header is not None and url.scheme != "https" and url.hostname not in LOOPBACK:
            raise LaunchError(
                f"refusing to send IOT_DAGSTER_AUTH_HEADER to {url.hostname} over plain http: "
                "use an https IOT_DAGSTER_URL"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": auth_header.value} if auth_header else {}

    @classmethod
    def from_settings(cls, settings: PlatformSettings, *, timeout_s: float = 300) -> JobLauncher:
        """The webserver at IOT_DAGSTER_URL, with the proxy's IOT_DAGSTER_AUTH_HEADER."""
        return cls(settings.dagster_url, timeout_s=timeout_s, auth_header=dagster_auth_header())

    def run(
        self,
        job_name: str,
        run_config: Mapping[str, Any],
        *,
        tags: dict[str, str] | None = None,
        progress: Callable[[str], None] = lambda _msg: None,
    ) -> RunOutcome:
        run_id = self._launch(job_name, run_config, tags or {})
        url = f"{self.base_url}/runs/{run_id}"
        progress(f"launched {job_name}: {url}")
        started = time.monotonic()
        deadline = started + self.timeout_s
        status = self._status(run_id)
        progress(f"{job_name}: {status.value}")
        next_note = started + PROGRESS_EVERY_S
        while status not in TERMINAL:
            now = time.monotonic()
            if now > deadline:
                raise LaunchError(f"run {run_id} still {status.value} after {self.timeout_s:.0f}s")
            if now >= next_note:  # a queued run can wait minutes: never stay silent
                progress(f"{job_name}: still {status.value} after {now - started:.0f}s")
                next_note = now + PROGRESS_EVERY_S
            time.sleep(0.5)
            previous, status = status, self._status(run_id)
            if status != previous:
                progress(f"{job_name}: {status.value} after {time.monotonic() - started:.0f}s")
        events = self._graphql(_RUN_EVENTS, runId=run_id)["logsForRun"].get("events", [])
        errors = [] if status == RunStatus.SUCCESS else run_errors(events)
        return RunOutcome(run_id, status, errors, url, materializations(events))

    def backfill(self, asset_keys: list[list[str]], partitions: list[str]) -> str:
        """Backfill ``partitions`` of the assets (as the UI's Materialize -> Backfill does)
        and wait until the daemon has finished it; returns the backfill's final status."""
        params = {
            "assetSelection": [{"path": key} for key in asset_keys],
            "partitionNames": partitions,
            "fromFailure": False,
        }
        launched = self._graphql(_LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise LaunchError(f"backfill refused: {launched.get('message', launched)}")
        backfill_id = launched["backfillId"]
        deadline = time.monotonic() + self.timeout_s
        while True:
            status = self._graphql(_BACKFILL_STATUS, id=backfill_id)["partitionBackfillOrError"]
            if "status" not in status:
                raise LaunchError(f"backfill {backfill_id}: {status.get('message', status)}")
            if status["status"] not in {"REQUESTED", "CANCELING", "FAILING"}:
                return status["status"]
            if time.monotonic() > deadline:
                raise LaunchError(f"backfill {backfill_id} not done after {self.timeout_s:.0f}s")
            time.sleep(1)

    def _launch(self, job_name: str, run_config: Mapping[str, Any], tags: dict[str, str]) -> str:
        """Launch ``job_name`` from the one code location that has it; returns the run id."""
        repositories = self._graphql(_JOB_LOCATIONS)["repositoriesOrError"]
        if "nodes" not in repositories:
            raise LaunchError(f"cannot list the code locations: {repositories.get('message')}")
        homes = [
            (repo["location"]["name"], repo["name"])
            for repo in repositories["nodes"]
            if any(job["name"] == job_name for job in repo["jobs"])
        ]
        if len(homes) != 1:
            where = f"in {len(homes)} code locations" if homes else "in no code location"
            raise LaunchError(f"cannot launch {job_name} at {self.base_url}: it is {where}")
        ((location, repository),) = homes
        params = {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": repository,
                "jobName": job_name,
            },
            "runConfigData": dict(run_config),
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        launched = self._graphql(_LAUNCH_RUN, executionParams=params)["launchRun"]
        if launched["__typename"] == "LaunchRunSuccess":
            return str(launched["run"]["runId"])
        reasons = [e["message"] for e in launched.get("errors", [])] or [
            launched.get("message") or launched["__typename"]
        ]
        raise LaunchError(f"cannot launch {job_name} at {self.base_url}: {'; '.join(reasons)}")

    def _status(self, run_id: str) -> RunStatus:
        try:
            run = self._graphql(_RUN_STATUS, runId=run_id)["runOrError"]
        except LaunchError as exc:
            raise LaunchError(f"lost track of run {run_id}: {exc}") from exc
        if "status" not in run:
            raise LaunchError(f"lost track of run {run_id}: {run.get('message', run)}")
        return RunStatus(run["status"])

    def _graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        try:
            response = requests.post(
                f"{self.base_url}/graphql",
                json={"query": query, "variables": variables},
                headers=self._headers,
                timeout=30,
            )
            response.raise_for_status()
        except requests.RequestException as exc:
            raise LaunchError(f"the Dagster webserver at {self.base_url}: {exc}") from exc
        body = response.json()
        if body.get("errors"):
            raise LaunchError(f"GraphQL error: {body['errors'][0].get('message')}")
        return body["data"]
