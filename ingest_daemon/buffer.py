"""The in-memory micro-batch: column lists appended on the MQTT thread, swapped out whole.

Each message remembers the connection epoch it arrived on: a packet id is only
meaningful on the connection that delivered it, so acks for an older epoch are dropped
(the broker redelivers those messages on the resumed session, and they are acked then).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Batch:
    received_at_us: list[int] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    qos: list[int] = field(default_factory=list)
    retain: list[bool] = field(default_factory=list)
    acks: list[tuple[int, int, int]] = field(default_factory=list)  # (epoch, mid, qos)
    size: int = 0
    opened_at: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.payloads)


class MessageBuffer:
    """Thread-safe append/swap; the flusher takes whole batches, never single messages."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._batch = Batch()

    def append(
        self,
        received_at_us: int,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        ack: tuple[int, int, int] | None,
    ) -> Batch | None:
        """Add one message; returns the full batch when this message filled it."""
        with self._lock:
            batch = self._batch
            if not batch.payloads:
                batch.opened_at = time.monotonic()
            batch.received_at_us.append(received_at_us)
            batch.topics.append(topic)
            batch.payloads.append(payload)
            batch.qos.append(qos)
            batch.retain.append(retain)
            if ack is not None:
                batch.acks.append(ack)
            batch.size += len(payload) + len(topic) + 16
            if len(batch.payloads) >= self.max_rows or batch.size >= self.max_bytes:
                self._batch = Batch()
                return batch
            return None

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
