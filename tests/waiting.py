"""Waiting in tests for something a running service will do: one loop, not one per module."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(
    what: str,
    check: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.5,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy, and
    return that. After ``timeout`` seconds the test fails naming ``what``, followed by
    ``explain()`` (the state that would tell a reader why)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s {explain()}".rstrip())
        time.sleep(interval)
