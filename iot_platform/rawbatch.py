"""The raw batch contract (DESIGN §5): one Parquet file per micro-batch, one row per MQTT
message, undecoded. The single definition of the schema, file metadata and object key
layout, used by the ingest daemon (writer) and the Dagster assets (reader).
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
KEY_ROOT = "raw/v1/"
INSTANCE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_PATTERN = re.compile(
    r"^raw/v1/date=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
    r"(?P<first>\d{8}T\d{12}Z)-(?P<instance>[A-Za-z0-9_-]{1,64})-(?P<seq>\d{8,})\.parquet$"
)
KEY_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

RAW_SCHEMA = pa.schema(
    [
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("topic", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("qos", pa.int8(), nullable=False),
        pa.field("retain", pa.bool_(), nullable=False),
    ]
)


class RawBatchError(ValueError):
    """A key or file does not follow the raw batch contract."""


@dataclass(frozen=True)
class BatchKey:
    """The parts of a raw batch object key."""

    first_received_at: dt.datetime
    instance: str
    seq: int

    @property
    def key(self) -> str:
        first = self.first_received_at.astimezone(dt.UTC)
        return (
            f"{hour_prefix(first)}{first.strftime(KEY_TIME_FORMAT)}-{self.instance}-{self.seq:08d}"
            ".parquet"
        )

    @property
    def partition_key(self) -> str:
        """The Dagster hourly partition (receive hour) this batch belongs to."""
        return partition_key(self.first_received_at)

    @classmethod
    def parse(cls, key: str) -> BatchKey:
        match = _KEY_PATTERN.match(key)
        if not match:
            raise RawBatchError(f"not a raw batch key: {key!r}")
        first = dt.datetime.strptime(match["first"], KEY_TIME_FORMAT).replace(tzinfo=dt.UTC)
        if (first.strftime("%Y-%m-%d"), f"{first.hour:02d}") != (match["date"], match["hour"]):
            raise RawBatchError(f"date/hour partition disagrees with the timestamp: {key!r}")
        return cls(first, match["instance"], int(match["seq"]))


def _from_epoch_us(value: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=value)


def partition_key(at: dt.datetime) -> str:
    """The Dagster hourly partition (``2026-03-01-12:00``) of the receive hour ``at`` is in."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d-%H:00")


def hour_prefix(at: dt.datetime) -> str:
    """``raw/v1/date=YYYY-MM-DD/hour=HH/`` for the UTC hour containing ``at``."""
    at = at.astimezone(dt.UTC)
    return f"{KEY_ROOT}date={at:%Y-%m-%d}/hour={at:%H}/"


def validate_instance(instance: str) -> str:
    if not INSTANCE_PATTERN.fullmatch(instance):
        raise RawBatchError(f"instance id {instance!r} must match {INSTANCE_PATTERN.pattern}")
    return instance


@dataclass(frozen=True)
class EncodedBatch:
    key: BatchKey
    data: bytes
    rows: int
    payload_bytes: int


def encode_batch(
    *,
    received_at_us: Sequence[int],
    topics: Sequence[str],
    payloads: Sequence[bytes],
    qos: Sequence[int],
    retain: Sequence[bool],
    instance: str,
    seq: int,
) -> EncodedBatch:
    """Build the zstd Parquet file for one micro-batch (rows in receive order)."""
    rows = len(payloads)
    if rows == 0:
        raise RawBatchError("a raw batch needs at least one message")
    validate_instance(instance)
    received = pa.array(received_at_us, type=pa.int64()).cast(RAW_SCHEMA.field("received_at").type)
    table = pa.Table.from_arrays(
        [
            received,
            pa.array(topics, type=pa.string()).dictionary_encode(),
            pa.array(payloads, type=pa.binary()),
            pa.array(qos, type=pa.int8()),
            pa.array(retain, type=pa.bool_()),
        ],
        schema=RAW_SCHEMA,
    )
    first_us, last_us = min(received_at_us), max(received_at_us)
    first, last = _from_epoch_us(first_us), _from_epoch_us(last_us)
    key = BatchKey(first, instance, seq)
    table = table.replace_schema_metadata(
        {
            "iot.schema_version": SCHEMA_VERSION,
            "iot.instance": instance,
            "iot.batch_seq": str(seq),
            "iot.rows": str(rows),
            "iot.first_received_at": first.isoformat(),
            "iot.last_received_at": last.isoformat(),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=["topic"])
    payload_bytes = int(table.column("payload").nbytes)
    return EncodedBatch(key=key, data=sink.getvalue(), rows=rows, payload_bytes=payload_bytes)


@dataclass(frozen=True)
class DecodedBatch:
    table: pa.Table
    metadata: dict[str, str]


def read_batch(data: bytes) -> DecodedBatch:
    """Read one raw batch file, checking the schema version before trusting the columns."""
    try:
        # ParquetFile.read, not read_table: same table, half the fixed cost per file (no
        # dataset machinery), which is most of the cost of a small micro-batch.
        table = pq.ParquetFile(io.BytesIO(data)).read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise RawBatchError(f"unreadable Parquet: {exc}") from None
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    version = metadata.get("iot.schema_version")
    if version != SCHEMA_VERSION:
        raise RawBatchError(f"raw batch schema version {version!r}, expected {SCHEMA_VERSION!r}")
    missing = set(RAW_SCHEMA.names) - set(table.column_names)
    if missing:
        raise RawBatchError(f"raw batch lacks columns {sorted(missing)}")
    return DecodedBatch(table=table.select(RAW_SCHEMA.names), metadata=metadata)
