"""When a live load run stops following its hour, and which new batches it sees."""

from __future__ import annotations

import datetime as dt

from iot_platform.objectstore import LocalDirectoryStore
from iot_platform.rawbatch import BatchKey
from iot_platform.warehouse.follow import (
    HOUR_CLOSE_GRACE_S,
    IDLE_S,
    LOOKBACK,
    FollowWindow,
    HourListing,
)

HOUR = dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)


def _window() -> FollowWindow:
    return FollowWindow(deadline=300.0, hour_end=HOUR + dt.timedelta(hours=1), last_new=0.0)


def test_a_run_follows_while_batches_keep_landing_inside_its_window_and_hour():
    window = _window()
    for t in range(1, 300, 7):
        window.saw_new(float(t))
        assert window.stop_reason(float(t), HOUR + dt.timedelta(seconds=t), True) is None
    assert "IOT_LOAD_FOLLOW_S" in (window.stop_reason(300.0, HOUR, True) or "")


def test_a_quiet_hour_ends_the_run_so_the_rollups_refresh():
    window = _window()
    window.saw_new(10.0)
    assert window.stop_reason(10.0, HOUR, True) is None
    assert window.stop_reason(10.0 + IDLE_S - 1, HOUR, False) is None
    assert window.stop_reason(10.0 + IDLE_S - 1, HOUR, False) is None  # asking changes nothing
    assert "no new batch" in (window.stop_reason(10.0 + IDLE_S, HOUR, False) or "")


def test_a_closed_hour_ends_the_run_once_a_poll_finds_nothing_new():
    window = _window()
    closed = HOUR + dt.timedelta(hours=1, seconds=HOUR_CLOSE_GRACE_S)
    window.saw_new(5.0)
    assert window.stop_reason(5.0, closed, True) is None  # its last batches still load
    assert "hour is over" in (window.stop_reason(6.0, closed, False) or "")


def _put(store: LocalDirectoryStore, at: dt.datetime, instance: str, seq: int) -> str:
    key = BatchKey(at, instance, seq).key
    store.put(key, b"batch")
    return key


def test_the_listing_returns_each_new_batch_once_including_late_uploads(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    listing = HourListing(store, HOUR)
    manifest = [_put(store, HOUR + dt.timedelta(minutes=10), "a", 1)]
    listing.mark_seen(manifest)
    assert listing.new_batches() == []

    newer = _put(store, HOUR + dt.timedelta(minutes=11), "a", 2)
    # A second daemon's batch with an earlier key lands later (inside the lookback).
    late = _put(store, HOUR + dt.timedelta(minutes=11) - LOOKBACK / 2, "b", 1)
    store.put(HOUR.strftime("raw/v1/date=%Y-%m-%d/hour=%H/") + "notes.txt", b"not a batch")
    next_hour = _put(store, HOUR + dt.timedelta(hours=1, seconds=1), "a", 3)
    assert sorted(info.key for info in listing.new_batches()) == sorted([newer, late])
    assert listing.new_batches() == []
    assert next_hour not in listing.seen
