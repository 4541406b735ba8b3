"""Following an hour's raw batches: what a live load run loads after its manifest.

A load run costs ~10 s before its first row (sensor tick, queue, a new process, imports)
and a few more after its last (rollups). Paid once per manifest, that overhead was most of
the publish->queryable latency at light load and most of the CPU at heavy load. So a live
run, once its manifest is loaded, keeps listing its hour and loads each new batch as it
lands, until one of the reasons in ``FollowWindow.stop_reason``. The sensor meanwhile
keeps the hour's new keys pending and drops those the ledger already holds, so nothing
depends on the run seeing every key: a batch it misses (a late upload from a spool) goes
into the hour's next run as before.

While it follows, ``RollupsBeside`` refreshes the rollups over what it loaded every
``ROLLUP_EVERY_S``, on a connection and thread of its own: the rollups stay a minute
fresh, and the rollup steps at the end of the run have only the last minute left instead
of the whole window (40 s for 5 minutes at 50,000 rows/s, during which nothing loaded).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import psycopg

from iot_platform.objectstore import ObjectInfo, ObjectStore
from iot_platform.rawbatch import KEY_TIME_FORMAT, BatchKey, RawBatchError, hour_prefix
from iot_platform.warehouse.aggregates import refresh_loaded
from iot_platform.warehouse.migrations import Dialect

POLL_S = 0.5
# No new batch for this long: the devices went quiet; end, so the rollups refresh.
IDLE_S = 30.0
# After the hour ends its last batches still arrive (the ingest daemons flush every second).
HOUR_CLOSE_GRACE_S = 10.0
# How far back each listing looks before the newest key seen: two daemons upload
# independently, so keys do not land in key order.
LOOKBACK = dt.timedelta(seconds=60)
# How often a following run refreshes the rollups beside its load.
ROLLUP_EVERY_S = 60.0


@dataclass
class FollowWindow:
    """When a run stops following its hour (monotonic seconds, UTC wall clock)."""

    deadline: float
    hour_end: dt.datetime
    last_new: float

    def saw_new(self, now: float) -> None:
        """A poll found new batches at ``now``."""
        self.last_new = now

    def stop_reason(self, now: float, wall: dt.datetime, found_new: bool) -> str | None:
        """Why to stop following after a poll that found new batches or not; None: go on."""
        if now >= self.deadline:
            return "follow window ended (IOT_LOAD_FOLLOW_S)"
        if not found_new and wall >= self.hour_end + dt.timedelta(seconds=HOUR_CLOSE_GRACE_S):
            return "the hour is over and its last batches are loaded"
        if now - self.last_new >= IDLE_S:
            return f"no new batch for {IDLE_S:g} s"
        return None


@dataclass
class HourListing:
    """New batch objects of one receive hour, each returned once."""

    store: ObjectStore
    hour: dt.datetime
    seen: set[str] = field(default_factory=set)
    newest: dt.datetime | None = None  # receive time of the newest batch seen

    def mark_seen(self, keys: list[str]) -> None:
        for key in keys:
            self._see(key)

    def new_batches(self) -> list[ObjectInfo]:
        prefix = hour_prefix(self.hour)
        start_after = None
        if self.newest is not None and self.newest - LOOKBACK >= self.hour:
            start_after = prefix + (self.newest - LOOKBACK).strftime(KEY_TIME_FORMAT)
        return [
            info
            for info in self.store.list(prefix, start_after=start_after)
            if info.key not in self.seen and self._see(info.key)
        ]

    def _see(self, key: str) -> bool:
        """Remember ``key``; whether it is a batch key (other objects are the sensor's to
        report)."""
        self.seen.add(key)
        try:
            first = BatchKey.parse(key).first_received_at
        except RawBatchError:
            return False
        self.newest = first if self.newest is None else max(self.newest, first)
        return True


@dataclass
class RollupsBeside:
    """Refresh the rollups over what run ``run_id`` has loaded, every ``ROLLUP_EVERY_S``,
    in a thread with its own (autocommit) connection, while the run goes on loading."""

    connect: Callable[[], AbstractContextManager[psycopg.Connection]]
    dialect: Dialect
    run_id: str
    refreshed: int = 0  # batches whose rollups were refreshed here
    errors: list[str] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = time.monotonic() + ROLLUP_EVERY_S

    def tick(self, now: float) -> None:
        """Start a refresh when one is due and none is running."""
        if now < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        self._next = now + ROLLUP_EVERY_S
        self._thread = threading.Thread(target=self._refresh, name="rollups", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for a refresh in progress: the rollup steps must not overlap it."""
        if self._thread is not None:
            self._thread.join()

    def _refresh(self) -> None:
        try:
            with self.connect() as conn:
                self.refreshed += refresh_loaded(conn, self.dialect, self.run_id)
        except psycopg.Error as exc:  # the rollup steps at the end refresh what is left
            self.errors.append(str(exc))
