"""Synthetic raw batches for warehouse and pipeline tests (good, duplicate and bad rows)."""

from __future__ import annotations

import datetime as dt
import json
import random

from iot_platform.objectstore import ObjectInfo, ObjectStore
from iot_platform.rawbatch import encode_batch

METRICS = {"voltage_dc": (600.0, 800.0), "current_dc": (0.0, 50.0), "power_dc": (0.0, 40_000.0)}


def envelope(device_id: str, seq: int, ts: dt.datetime, values: dict[str, float]) -> bytes:
    return json.dumps(
        {
            "v": 2,
            "device_id": device_id,
            "ts": ts.isoformat(),
            "seq": seq,
            "msg_type": "telemetry",
            "measurements": [{"type": k, "val": v, "unit": "V"} for k, v in values.items()],
        }
    ).encode()


def telemetry_messages(
    devices: list[str],
    start: dt.datetime,
    count: int,
    *,
    seed: int = 1,
    every_s: float = 10.0,
    first_seq: int = 0,
) -> list[tuple[dt.datetime, str, bytes]]:
    """(received_at, topic, payload) for ``count`` envelopes per device, ``every_s`` apart,
    with seq ``first_seq``, ``first_seq + 1``, ... The warehouse de-duplicates on
    (device_id, seq) across batches: several calls for the same devices that mean new
    messages must continue the seq (DESIGN §4: monotonic per device), not restart it."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        ts = start + dt.timedelta(seconds=n * every_s)
        seq = first_seq + n
        for device_id in devices:
            values = {m: round(rng.uniform(lo, hi), 2) for m, (lo, hi) in METRICS.items()}
            out.append(
                (
                    ts + dt.timedelta(milliseconds=150),
                    f"iot/{device_id}/telemetry",
                    envelope(device_id, seq, ts, values),
                )
            )
    return out


def put_batch(
    store: ObjectStore,
    messages: list[tuple[dt.datetime, str, bytes]],
    *,
    seq: int,
    instance: str = "test",
) -> ObjectInfo:
    encoded = encode_batch(
        received_at_us=[int(r.timestamp() * 1_000_000) for r, _, _ in messages],
        topics=[t for _, t, _ in messages],
        payloads=[p for _, _, p in messages],
        qos=[1] * len(messages),
        retain=[False] * len(messages),
        instance=instance,
        seq=seq,
    )
    store.put(encoded.key.key, encoded.data)
    return store.stat(encoded.key.key)
