"""`iot-platform simulate`: enroll a simulated fleet through the enrollment job, then publish.

Each device is enrolled by launching ``enroll_device`` through the Dagster webserver (the
same path as an operator), with a server-generated key (development). Devices already
holding a valid certificate and key are reused, so a restarted stack keeps its fleet.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterable

import psycopg

from iot_platform.enrollment import certificates
from iot_platform.launcher import JobLauncher, LaunchError
from iot_platform.pki import device_paths
from iot_platform.pki_runs import ACTOR_TAG, ENROLL
from iot_platform.settings import PlatformSettings
from iot_platform.simulator import CONTROLLER_PARAMETERS, FAULTS, Fleet, FleetReport, plan_fleet

log = logging.getLogger(__name__)


def parse_faults(specs: Iterable[str]) -> dict[int, set[str]]:
    """``["1=skew", "3=gap,duplicate"]`` -> {1: {"skew"}, 3: {"gap", "duplicate"}}."""
    faults: dict[int, set[str]] = {}
    for spec in specs:
        index, sep, names = spec.partition("=")
        chosen = {name.strip() for name in names.split(",") if name.strip()}
        unknown = chosen - set(FAULTS)
        if not sep or not index.strip().isdigit() or not chosen or unknown:
            raise ValueError(
                f"fault {spec!r}: use DEVICE_INDEX=FAULT[,FAULT] with faults from {FAULTS}"
            )
        faults.setdefault(int(index), set()).update(chosen)
    return faults


def enroll_fleet(
    settings: PlatformSettings, conninfo: str, launcher: JobLauncher, fleet: Fleet
) -> list[str]:
    """Enroll every device without a valid certificate and key; returns the ids enrolled."""
    enrolled = []
    with psycopg.connect(conninfo) as conn:
        valid = {row.device_id for row in certificates(conn) if row.status == "valid"}
    for device in fleet.devices:
        cert, key = device_paths(settings.certs_dir, device.device_id)
        if device.device_id in valid and cert.exists() and key.exists():
            continue
        config = {
            "device_id": device.device_id,
            "device_type": device.kind,
            "metadata": {"simulated": "true"},
        }
        outcome = launcher.run(ENROLL.job, ENROLL.run_config(config), tags={ACTOR_TAG: "simulator"})
        if not outcome.succeeded:
            raise LaunchError(f"enrolling {device.device_id} failed: {'; '.join(outcome.errors)}")
        enrolled.append(device.device_id)
    _register_profiles(conninfo, fleet)
    return enrolled


def _register_profiles(conninfo: str, fleet: Fleet) -> None:
    """Publishing intervals (the silent-device rule uses them) and controller parameters."""
    with psycopg.connect(conninfo) as conn:
        for device in fleet.devices:
            conn.execute(
                "UPDATE devices SET send_interval_s = %s, hello_interval_s = %s"
                " WHERE device_id = %s",
                [device.send_interval_s, device.hello_interval_s, device.device_id],
            )
            if device.kind != "controller":
                continue
            conn.cursor().executemany(
                """
                INSERT INTO device_parameters
                    (device_id, mode, connector, component, encoding, metric, unit, scale)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (device_id, mode, connector, component) DO NOTHING
                """,
                [(device.device_id, *parameter) for parameter in CONTROLLER_PARAMETERS],
            )


def simulate(
    settings: PlatformSettings,
    conninfo: str,
    *,
    count: int,
    interval_s: float,
    hello_interval_s: float,
    duration_s: float | None,
    faults: dict[int, set[str]],
    prefix: str,
) -> FleetReport:
    """Enroll, connect and publish until ``duration_s`` or SIGINT/SIGTERM."""
    devices = plan_fleet(count, prefix=prefix, send_interval_s=interval_s)
    for device in devices:
        device.hello_interval_s = hello_interval_s
    for index, names in faults.items():
        devices[index].faults = frozenset(names)  # indexes checked by the caller
    fleet = Fleet(
        devices,
        host=settings.broker_host,
        port=settings.broker_port,
        ca_file=settings.certs_dir / "ca.crt",
        credentials=lambda device: device_paths(settings.certs_dir, device.device_id),
    )
    launcher = JobLauncher.from_settings(settings)
    enrolled = enroll_fleet(settings, conninfo, launcher, fleet)
    log.info("enrolled %d device(s) through enroll_device: %s", len(enrolled), enrolled)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: fleet.stop())
    fleet.connect()
    described = ", ".join(
        f"{d.device_id} ({d.kind}{', ' + '+'.join(sorted(d.faults)) if d.faults else ''})"
        for d in devices
    )
    log.info("publishing every %.1fs: %s", interval_s, described)
    try:
        report = fleet.run(duration_s)
    finally:
        fleet.close()
    print(json.dumps(report.as_dict(), sort_keys=True), flush=True)
    return report
