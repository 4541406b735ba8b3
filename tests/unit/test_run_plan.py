"""The coalescing rule of the raw batch sensor (``discovery.plan_runs``), as pure logic."""

from __future__ import annotations

from iot_platform.discovery import Cursor, plan_runs

H8, H9 = "2026-11-22-08:00", "2026-11-22-09:00"


def test_an_hour_with_a_run_in_flight_keeps_every_key_waiting():
    plan = plan_runs({H8: ["a", "b"]}, {H8: ["c"], H9: ["x"]}, {H8}, max_keys_per_run=10)
    assert plan.runs == {H9: ["x"]}
    assert plan.waiting == {H8: ["a", "b", "c"]}
    assert plan.waiting_count == 3


def test_a_free_hour_takes_all_pending_keys_oldest_first_up_to_the_cap():
    plan = plan_runs({H8: ["b", "d"]}, {H8: ["a", "c", "e"]}, set(), max_keys_per_run=3)
    assert plan.runs == {H8: ["a", "b", "c"]}
    assert plan.waiting == {H8: ["d", "e"]}


def test_a_key_found_again_is_requested_once():
    plan = plan_runs({H8: ["a"]}, {H8: ["a", "b"]}, set(), max_keys_per_run=10)
    assert plan.runs == {H8: ["a", "b"]}
    assert plan.waiting == {}


def test_nothing_pending_nothing_requested():
    assert plan_runs({}, {}, {H8}, max_keys_per_run=10).runs == {}


def test_the_cursor_keeps_pending_keys_across_ticks():
    cursor = Cursor("k9", ["k8", "k9"], {H8: ["k1", "k2"]})
    again = Cursor.loads(cursor.dumps())
    assert again == cursor and again.pending_count == 2
    assert Cursor.loads('{"last_key": "k9", "recent": []}').pending == {}  # an older cursor
