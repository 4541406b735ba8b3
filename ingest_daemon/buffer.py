"""The in-memory micro-batch: column lists appended on the MQTT thread, swapped out whole.

Messages arrive in runs (everything one socket read delivered), and a run is added with
one ``extend`` call — list extends under one lock acquisition, no per-message Python
work beyond what building the columns already cost.

Each message keeps its packet id (0 for QoS 0: nothing to acknowledge) and the batch
remembers which connection epoch its rows arrived on: a packet id is only meaningful on
the connection that delivered it, so acks for an older epoch are dropped (the broker
redelivers those messages on the resumed session, and they are acked then).

``received_at`` is strictly increasing within a daemon: the messages of one run get
consecutive microseconds from the read time on. Scalar and parametrised topics carry no
device timestamp, so ``received_at`` is their ``ts`` and part of their identity; equal
stamps for one run (a burst redelivered after a restart) would make distinct readings
look like duplicates.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

ROW_OVERHEAD_BYTES = 16  # per row on top of payload and topic, for the max-bytes budget


@dataclass
class Batch:
    received_at_us: list[int] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    qos: list[int] = field(default_factory=list)
    retain: list[bool] = field(default_factory=list)
    mids: list[int] = field(default_factory=list)  # packet id per row; 0 = QoS 0
    epochs: list[tuple[int, int]] = field(default_factory=list)  # (first row, epoch)
    size: int = 0
    opened_at: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def ack_count(self) -> int:
        """Rows that need an acknowledgement (QoS > 0)."""
        return len(self.mids) - self.mids.count(0)

    def ack_runs(self) -> list[tuple[int, int, list[int]]]:
        """The packet ids to acknowledge as (epoch, qos, mids) runs, in receive order."""
        runs: list[tuple[int, int, list[int]]] = []
        stops = [start for start, _ in self.epochs[1:]] + [len(self.mids)]
        for (start, epoch), stop in zip(self.epochs, stops, strict=True):
            mids = self.mids[start:stop]
            qos = self.qos[start:stop]
            if 0 not in qos and 2 not in qos:  # the usual case: every row QoS 1
                runs.append((epoch, 1, mids))
                continue
            for level in (1, 2):
                selected = [m for m, q in zip(mids, qos, strict=True) if q == level]
                if selected:
                    runs.append((epoch, level, selected))
        return runs


class MessageBuffer:
    """Thread-safe append/swap; the flusher takes whole batches, never single messages."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._batch = Batch()
        self._last_received_us = 0

    def append(
        self,
        received_at_us: int,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        mid: int,
        epoch: int,
    ) -> Batch | None:
        """Add one message; returns the full batch when this message filled it."""
        full = self.extend(received_at_us, [topic], [payload], [qos], [retain], [mid], epoch)
        return full[0] if full else None

    def extend(
        self,
        received_at_us: int,
        topics: list[str],
        payloads: list[bytes],
        qos: list[int],
        retain: list[bool],
        mids: list[int],
        epoch: int,
    ) -> list[Batch]:
        """Add a run of messages received together; returns the batches they filled.

        A batch is full once it holds ``max_rows`` rows or its size reaches ``max_bytes``
        (the row that reaches it is included), exactly as if they were added one by one.
        """
        count = len(payloads)
        full: list[Batch] = []
        start = 0
        with self._lock:
            first_us = max(received_at_us, self._last_received_us + 1)
            self._last_received_us = first_us + count - 1
            while start < count:
                batch = self._batch
                rows = len(batch.payloads)
                if not rows:
                    batch.opened_at = time.monotonic()
                if not batch.epochs or batch.epochs[-1][1] != epoch:
                    batch.epochs.append((rows, epoch))
                stop = min(count, start + self.max_rows - rows)
                whole = start == 0 and stop == count
                run_topics = topics if whole else topics[start:stop]
                run_payloads = payloads if whole else payloads[start:stop]
                size = (
                    sum(map(len, run_payloads))
                    + sum(map(len, run_topics))
                    + ROW_OVERHEAD_BYTES * (stop - start)
                )
                if batch.size + size >= self.max_bytes:  # cut at the row reaching the limit
                    size = 0
                    for n in range(start, stop):
                        size += len(payloads[n]) + len(topics[n]) + ROW_OVERHEAD_BYTES
                        if batch.size + size >= self.max_bytes:
                            stop = n + 1
                            break
                    whole = start == 0 and stop == count
                    run_topics = topics if whole else topics[start:stop]
                    run_payloads = payloads if whole else payloads[start:stop]
                batch.received_at_us.extend(range(first_us + start, first_us + stop))
                batch.topics.extend(run_topics)
                batch.payloads.extend(run_payloads)
                batch.qos.extend(qos if whole else qos[start:stop])
                batch.retain.extend(retain if whole else retain[start:stop])
                batch.mids.extend(mids if whole else mids[start:stop])
                batch.size += size
                if len(batch.payloads) >= self.max_rows or batch.size >= self.max_bytes:
                    self._batch = Batch()
                    full.append(batch)
                start = stop
        return full

    def take_if_older_than(self, max_age_s: float) -> Batch | None:
        with self._lock:
            batch = self._batch
            if batch.payloads and time.monotonic() - batch.opened_at >= max_age_s:
                self._batch = Batch()
                return batch
            return None

    def take(self) -> Batch | None:
        with self._lock:
            batch = self._batch
            if not batch.payloads:
                return None
            self._batch = Batch()
            return batch
