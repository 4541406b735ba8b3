"""Find raw batches the pipeline has not requested yet (the sensor's logic, kept pure).

Keys sort by the batch's first receive time, but they do not *arrive* in that order: two
daemons upload independently, and a spooled batch lands minutes after its time. So the
cursor is the last key requested plus the keys already requested inside a lateness
window; each tick lists, with ``start_after``, only the hour prefixes from
``min(last key's time, now - lateness)`` on. A batch later than the window (a store outage
longer than it) is loaded by a backfill of its hour, which loads every batch under it.

Coalescing: keys found while a load run for their hour is still queued or running wait in
the cursor (``pending``) and go into that hour's next run, all of them up to a cap. Under
load, runs grow instead of the run queue; the per-run cost (process start-up, imports,
rollup refresh) is paid once for many batches. ``pending`` is bounded: when it is full,
listing pauses (the cursor does not move, so nothing is skipped) until runs drain it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field

from iot_platform.objectstore import ObjectStore
from iot_platform.rawbatch import KEY_TIME_FORMAT, BatchKey, RawBatchError, hour_prefix


@dataclass
class Cursor:
    last_key: str | None = None
    recent: list[str] = field(default_factory=list)
    # partition key -> keys found but not yet requested (their hour had a run in flight)
    pending: dict[str, list[str]] = field(default_factory=dict)

    @property
    def pending_count(self) -> int:
        return sum(len(keys) for keys in self.pending.values())

    def dumps(self) -> str:
        return json.dumps(
            {"last_key": self.last_key, "recent": self.recent, "pending": self.pending}
        )

    @classmethod
    def loads(cls, raw: str | None) -> Cursor:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(
            data.get("last_key"), list(data.get("recent", [])), dict(data.get("pending", {}))
        )


@dataclass(frozen=True)
class Discovery:
    by_partition: dict[str, list[str]]  # partition key -> new batch keys, sorted
    cursor: Cursor
    listed: int
    ignored: list[str]  # keys under raw/v1/ that do not follow the contract
    capped: bool

    @property
    def new_keys(self) -> int:
        return sum(len(keys) for keys in self.by_partition.values())


def _time_of(key: str) -> dt.datetime:
    return BatchKey.parse(key).first_received_at


def discover(
    store: ObjectStore,
    cursor: Cursor,
    now: dt.datetime,
    *,
    lateness: dt.timedelta = dt.timedelta(minutes=15),
    initial_lookback: dt.timedelta = dt.timedelta(hours=24),
    max_keys: int = 2000,
) -> Discovery:
    low = now - lateness
    floor = _time_of(cursor.last_key) if cursor.last_key else now - initial_lookback
    floor = min(floor, low)
    seen = set(cursor.recent)
    new: list[str] = []
    ignored: list[str] = []
    listed = 0
    capped = False
    hour = floor.replace(minute=0, second=0, microsecond=0)
    # one hour ahead: a daemon's clock may run ahead of the sensor's
    while hour <= now + dt.timedelta(hours=1) and not capped:
        prefix = hour_prefix(hour)
        start_after = prefix + floor.strftime(KEY_TIME_FORMAT) if hour <= floor else None
        for info in store.list(prefix, start_after=start_after):
            listed += 1
            key = info.key
            try:
                key_time = _time_of(key)
            except RawBatchError:
                ignored.append(key)
                continue
            if key in seen:
                continue
            if cursor.last_key and key <= cursor.last_key and key_time < low:
                continue  # requested before the window moved past it
            new.append(key)
            if len(new) >= max_keys:
                capped = True
                break
        hour += dt.timedelta(hours=1)

    new.sort()
    by_partition: dict[str, list[str]] = defaultdict(list)
    for key in new:
        by_partition[BatchKey.parse(key).partition_key].append(key)
    last_key = max([k for k in (cursor.last_key, *new) if k], default=None)
    recent = sorted(k for k in seen.union(new) if _time_of(k) >= low)
    return Discovery(
        dict(by_partition), Cursor(last_key, recent, cursor.pending), listed, ignored, capped
    )


@dataclass(frozen=True)
class RunPlan:
    runs: dict[str, list[str]]  # partition key -> keys for a new run now
    waiting: dict[str, list[str]]  # partition key -> keys left pending

    @property
    def waiting_count(self) -> int:
        return sum(len(keys) for keys in self.waiting.values())


def plan_runs(
    pending: dict[str, list[str]],
    found: dict[str, list[str]],
    in_flight: set[str],
    *,
    max_keys_per_run: int,
) -> RunPlan:
    """At most one run per hour: an hour with a run in flight keeps all its keys waiting;
    any other hour gets one run with its oldest keys, up to ``max_keys_per_run``."""
    runs: dict[str, list[str]] = {}
    waiting: dict[str, list[str]] = {}
    for partition in sorted(pending.keys() | found.keys()):
        keys = sorted(set(pending.get(partition, ())).union(found.get(partition, ())))
        if partition in in_flight:
            waiting[partition] = keys
            continue
        runs[partition] = keys[:max_keys_per_run]
        if keys[max_keys_per_run:]:
            waiting[partition] = keys[max_keys_per_run:]
    return RunPlan(runs, waiting)
