"""The ingest buffer stamps every message with a distinct, increasing receive time."""

from __future__ import annotations

from ingest_daemon.buffer import MessageBuffer


def _run(buffer: MessageBuffer, at_us: int, count: int) -> None:
    buffer.extend(
        at_us,
        [f"devices/d/temperature{n}" for n in range(count)],
        [b"21.5"] * count,
        [1] * count,
        [False] * count,
        list(range(1, count + 1)),
        epoch=1,
    )


def test_a_run_gets_consecutive_microseconds_and_runs_never_go_back():
    buffer = MessageBuffer(max_rows=100, max_bytes=1 << 20)
    _run(buffer, 1_000, 3)  # one socket read delivering three messages
    _run(buffer, 1_001, 2)  # the clock says 1_001, but 1_000..1_002 are taken
    _run(buffer, 5_000, 1)
    stamps = buffer._batch.received_at_us
    assert stamps == [1_000, 1_001, 1_002, 1_003, 1_004, 5_000]


def test_stamps_stay_distinct_across_the_batches_a_run_fills():
    buffer = MessageBuffer(max_rows=4, max_bytes=1 << 20)
    full = buffer.extend(
        7_000, ["t"] * 6, [b"x"] * 6, [1] * 6, [False] * 6, list(range(1, 7)), epoch=1
    )
    assert [b.received_at_us for b in full] == [[7_000, 7_001, 7_002, 7_003]]
    assert buffer._batch.received_at_us == [7_004, 7_005]
