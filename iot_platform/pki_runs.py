"""The PKI jobs as the CLI and the simulator launch them, without importing Dagster.

Launching ``enroll_device`` through the webserver needs only the job's name, its op's name,
the actor tag and the shape of its run config. Importing the Dagster definitions for that
cost about 3 s on every CLI call; the definitions (``iot_platform/defs/pki/enrollment.py``)
take their names from here instead, so the launcher and the jobs cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Who launched a PKI run (``cli:<user>``, ``simulator``; the UI sets none): the registry's
# audit trail reads it.
ACTOR_TAG = "iot/actor"
# One PKI job at a time (dagster.yaml's tag concurrency limit), and never retried blindly.
PKI_JOB_TAGS = {"iot/job": "pki"}


@dataclass(frozen=True)
class PkiJob:
    """A single-op PKI job: its name and the name of the op that takes the config."""

    job: str
    op: str

    def run_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"ops": {self.op: {"config": dict(config)}}}


ENROLL = PkiJob(job="enroll_device", op="issue_certificate")
REVOKE = PkiJob(job="revoke_certificate", op="revoke_certificates")
