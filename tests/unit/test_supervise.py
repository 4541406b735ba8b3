"""The embedded stack's supervisor: restart what crashes, give up on a crash loop."""

from __future__ import annotations

import time
from pathlib import Path

from iot_platform.services.process import ChildProcess
from iot_platform.stack import MAX_RESTARTS, Supervised, supervise


def _child(tmp_path: Path, name: str, argv: list[str], *, essential: bool = True) -> Supervised:
    def start() -> ChildProcess:
        return ChildProcess(name, argv, tmp_path / f"{name}.log").start()

    return Supervised(name, start(), start, essential)


def test_a_crashing_child_is_restarted_and_an_optional_crash_loop_is_dropped(tmp_path):
    service = _child(tmp_path, "service", ["sleep", "30"])
    flaky = _child(tmp_path, "simulator", ["false"], essential=False)
    children = [service, flaky]
    deadline = time.monotonic() + 20

    def done() -> bool:
        return flaky not in children or time.monotonic() > deadline

    try:
        code = supervise(children, done, 0.05)
    finally:
        service.process.stop()
    assert code == 0
    assert children == [service] and service.process.running() is False  # stopped above
    assert len(flaky.restarts) == MAX_RESTARTS


def test_an_essential_crash_loop_stops_the_stack(tmp_path):
    broken = _child(tmp_path, "postgres", ["false"])
    deadline = time.monotonic() + 20
    assert supervise([broken], lambda: time.monotonic() > deadline, 0.05) == 1
    assert len(broken.restarts) == MAX_RESTARTS
