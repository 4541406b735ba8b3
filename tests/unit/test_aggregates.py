"""Rollup window arithmetic: whole buckets, and no overflow at the ends of the calendar."""

from __future__ import annotations

import datetime as dt

import pytest

from iot_platform.warehouse.aggregates import ROLLUPS, align

UTC = dt.UTC


def test_windows_are_widened_to_whole_buckets():
    start = dt.datetime(2026, 11, 22, 9, 58, 30, tzinfo=UTC)
    end = dt.datetime(2026, 11, 22, 10, 7, 0, tzinfo=UTC)
    assert align(start, end, dt.timedelta(minutes=1)) == (
        dt.datetime(2026, 11, 22, 9, 58, tzinfo=UTC),
        dt.datetime(2026, 11, 22, 10, 8, tzinfo=UTC),
    )
    assert align(start, end, dt.timedelta(days=1)) == (
        dt.datetime(2026, 11, 22, tzinfo=UTC),
        dt.datetime(2026, 11, 23, tzinfo=UTC),
    )


@pytest.mark.parametrize("name", sorted(ROLLUPS))
def test_the_ends_of_the_calendar_clamp_instead_of_overflowing(name):
    width = ROLLUPS[name].width
    last = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    first = dt.datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert align(first, last, width) == (
        dt.datetime.min.replace(tzinfo=UTC),
        dt.datetime.max.replace(tzinfo=UTC),
    )
