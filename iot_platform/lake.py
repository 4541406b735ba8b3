"""The compacted raw lake: each closed hour of raw micro-batches rewritten as a few large
Parquet files, and the micro-batches' lifecycle after that. Imports no Dagster.

Why: the ingest daemon writes a micro-batch every ``INGEST_MAX_AGE_S`` (about 3,600 small
files per daemon per hour), so an analyst's query over a day opens tens of thousands of
files. Compaction rewrites an hour into files of up to ``IOT_LAKE_FILE_MAX_ROWS`` rows
(one per hour at ordinary rates), sorted by (``device_id``, ``received_at``) with small
row groups, so a query for one device reads a few row groups of 24 files.

Layout (same bucket as the raw batches; ``date=``/``hour=`` as in ``rawbatch``):

* ``lake/v1/date=YYYY-MM-DD/hour=HH/part-{generation}-{n:03d}.parquet`` — the raw batch
  columns (DESIGN §5) plus ``device_id`` (the topic's device level, ``topics.DEVICE_LEVEL``);
* ``lake/manifests/v1/date=YYYY-MM-DD/hour=HH.json`` — the commit point: the parts, the
  micro-batches they hold (with each one's etag, size, rows and checksum) and the hour's
  row count and content checksum.

Rules:

* An hour is compacted only once it has closed plus a lateness allowance.
* The new parts are written, read back and checked (row count and content checksum equal
  to the sources) before the manifest names them; only then are the previous generation's
  parts removed. A failed check leaves the previous state untouched.
* Idempotent: the generation is a digest of the micro-batch keys it holds, so a re-run
  over the same batches writes the same keys, and a hour whose manifest already holds
  every listed batch is left alone.
* Late micro-batches (landing after their hour was compacted) are never lost: a reader
  takes the manifest's parts plus every micro-batch the manifest does not name, and the
  next compaction of the hour (the sensor requests it) merges the previous parts with
  the late batches into a new generation.
* A micro-batch is deleted only when the manifest holds it, the load ledger has it, both
  happened at least the retention ago, and the hour's parts still verify against the
  manifest (a batch whose etag changed since is re-checksummed first).

The content checksum is order-independent (the wrapping sum of a stable xxh3 hash per
row, via ``polars-hash``), so micro-batches in any order and sorted parts agree, and it
stays comparable across Polars versions for as long as a manifest lives.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl
import polars_hash as plh
import pyarrow as pa
import pyarrow.parquet as pq

from iot_platform.objectstore import ObjectInfo, ObjectNotFound, ObjectStore
from iot_platform.rawbatch import (
    KEY_ROOT,
    RAW_SCHEMA,
    BatchKey,
    RawBatchError,
    hour_prefix,
    partition_key,
    read_batch,
)
from iot_platform.topics import DEVICE_LEVEL

LAKE_ROOT = "lake/v1/"
MANIFEST_ROOT = "lake/manifests/v1/"
LAKE_VERSION = 1
CHECKSUM_ALGORITHM = "sum64(xxh3_64(received_at|xxh3(topic)|xxh3(payload)|qos|retain))"
# Small row groups: their min/max statistics on device_id let a one-device query skip most
# of an hour's file (a 16k-row group of 200-byte messages is ~1 MB compressed or less).
ROW_GROUP_ROWS = 16_384
LAKE_SCHEMA = RAW_SCHEMA.append(pa.field("device_id", pa.string(), nullable=True))
_MASK64 = (1 << 64) - 1
# Micro-batches are small: reading a few at once hides the object store's latency.
READ_THREADS = 8
READ_WINDOW = 256


class LakeError(RuntimeError):
    """Compaction or verification failed; nothing was deleted and the message says why."""


class HourNotClosed(LakeError):
    """The hour (plus the lateness allowance) has not passed yet."""


def device_id_expr(topic: str = "topic") -> pl.Expr:
    """The device id of a raw topic (its ``topics.DEVICE_LEVEL``); null if it has none."""
    return pl.col(topic).cast(pl.String).str.split("/").list.get(DEVICE_LEVEL, null_on_oob=True)


def _relative(hour: dt.datetime) -> str:
    """``date=YYYY-MM-DD/hour=HH/`` — the raw batch partition path, reused as defined there."""
    return hour_prefix(hour)[len(KEY_ROOT) :]


def lake_prefix(hour: dt.datetime) -> str:
    return LAKE_ROOT + _relative(hour)


def manifest_key(hour: dt.datetime) -> str:
    return MANIFEST_ROOT + _relative(hour).rstrip("/") + ".json"


def hour_start(at: dt.datetime) -> dt.datetime:
    return at.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _xxh3(expr: pl.Expr) -> pl.Expr:
    return plh.NonCryptographicHashingNameSpace(expr).xxh3_64()


@dataclass(frozen=True)
class Digest:
    """Row count and order-independent content checksum of a set of raw messages."""

    rows: int = 0
    checksum: int = 0  # wrapping 64-bit sum of the row hashes

    def __add__(self, other: Digest) -> Digest:
        return Digest(self.rows + other.rows, (self.checksum + other.checksum) & _MASK64)

    @property
    def hex(self) -> str:
        return f"{self.checksum:016x}"

    @classmethod
    def parse(cls, rows: int, checksum: str) -> Digest:
        return cls(rows, int(checksum, 16))

    @classmethod
    def of(cls, table: pa.Table) -> Digest:
        """The digest of a table with the raw batch columns (extra columns are ignored)."""
        return digests([table])[0]


def digests(tables: Sequence[pa.Table]) -> list[Digest]:
    """Each table's digest, in one vectorised pass over all of them.

    Each row's fields are rendered to text (the bytes fields through their own xxh3),
    joined with ``|`` and hashed; the row hashes are summed per table as two 32-bit halves,
    so the 64-bit wrapping sum needs no overflowing integer arithmetic in Polars."""
    if not tables:
        return []
    frame = pl.from_arrow(pa.concat_tables([_plain(table) for table in tables]))
    assert isinstance(frame, pl.DataFrame)  # a Table converts to a DataFrame
    counts = pl.Series([table.num_rows for table in tables], dtype=pl.UInt32)
    source = pl.Series(range(len(tables)), dtype=pl.UInt32).to_frame("s")
    frame = frame.with_columns(_source=source.select(pl.col("s").repeat_by(counts).explode())["s"])
    row = pl.concat_str(
        [
            pl.col("received_at").dt.epoch("us").cast(pl.String),
            _xxh3(pl.col("topic")).cast(pl.String),
            _xxh3(pl.col("payload")).cast(pl.String),
            pl.col("qos").cast(pl.String),
            pl.col("retain").cast(pl.String),
        ],
        separator="|",
    )
    half = pl.lit(1 << 32, dtype=pl.UInt64)
    sums = (
        frame.select("_source", h=_xxh3(row))
        .group_by("_source")
        .agg(rows=pl.len(), hi=(pl.col("h") // half).sum(), lo=(pl.col("h") % half).sum())
    )
    found = {
        source: Digest(rows, ((hi << 32) + lo) & _MASK64)
        for source, rows, hi, lo in sums.iter_rows()
    }
    return [found.get(n, Digest()) for n in range(len(tables))]


@dataclass(frozen=True)
class SourceEntry:
    """A micro-batch held by a compacted hour, as it was when compacted."""

    etag: str
    size: int
    digest: Digest


@dataclass(frozen=True)
class Part:
    key: str
    rows: int
    size: int


@dataclass(frozen=True)
class Manifest:
    """The commit record of a compacted hour (``manifest_key``)."""

    hour: dt.datetime
    generation: str
    compacted_at: dt.datetime
    digest: Digest
    parts: tuple[Part, ...]
    sources: dict[str, SourceEntry]

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "version": LAKE_VERSION,
                "hour": self.hour.isoformat(),
                "generation": self.generation,
                "compacted_at": self.compacted_at.isoformat(),
                "rows": self.digest.rows,
                "checksum": self.digest.hex,
                "checksum_algorithm": CHECKSUM_ALGORITHM,
                "parts": [vars(part) for part in self.parts],
                "sources": {
                    key: [e.etag, e.size, e.digest.rows, e.digest.hex]
                    for key, e in sorted(self.sources.items())
                },
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        algorithm = raw.get("checksum_algorithm")
        if raw.get("version") != LAKE_VERSION or algorithm != CHECKSUM_ALGORITHM:
            raise LakeError(
                f"lake manifest version {raw.get('version')!r} / checksum {algorithm!r} is "
                f"not this platform's ({LAKE_VERSION})"
            )
        return cls(
            hour=dt.datetime.fromisoformat(raw["hour"]),
            generation=raw["generation"],
            compacted_at=dt.datetime.fromisoformat(raw["compacted_at"]),
            digest=Digest.parse(raw["rows"], raw["checksum"]),
            parts=tuple(Part(**part) for part in raw["parts"]),
            sources={
                key: SourceEntry(etag, size, Digest.parse(rows, checksum))
                for key, (etag, size, rows, checksum) in raw["sources"].items()
            },
        )


def read_manifest(store: ObjectStore, hour: dt.datetime) -> Manifest | None:
    try:
        return Manifest.loads(store.get(manifest_key(hour)))
    except ObjectNotFound:
        return None


def list_batches(store: ObjectStore, hour: dt.datetime) -> list[ObjectInfo]:
    """The hour's micro-batches (keys that follow the raw batch contract), in key order."""
    out = []
    for info in store.list(hour_prefix(hour)):
        try:
            BatchKey.parse(info.key)
        except RawBatchError:
            continue  # not a batch: the loader ignores it too
        out.append(info)
    return out


def unheld_batches(
    store: ObjectStore, hour: dt.datetime
) -> tuple[Manifest | None, list[ObjectInfo]]:
    """The hour's manifest and its micro-batches that manifest does not hold (never
    compacted, or late since). The manifest is read before the listing: a batch deleted
    after compaction is then in the manifest already, so no batch is missed or doubled."""
    manifest = read_manifest(store, hour)
    held = manifest.sources if manifest else {}
    return manifest, [info for info in list_batches(store, hour) if info.key not in held]


def generation_of(keys: Iterable[str]) -> str:
    """Deterministic for a set of micro-batch keys: a re-run writes the same part keys."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _plain(table: pa.Table) -> pa.Table:
    """The raw columns with ``topic`` as plain strings (batches' dictionaries differ)."""
    table = table.select(RAW_SCHEMA.names)
    return table.set_column(
        RAW_SCHEMA.get_field_index("topic"), "topic", table.column("topic").cast(pa.string())
    )


def _read_batch_table(store: ObjectStore, key: str) -> pa.Table:
    return _plain(read_batch(store.get(key)).table)


def _read_part_table(store: ObjectStore, key: str) -> pa.Table:
    try:
        return _plain(pq.read_table(io.BytesIO(store.get(key))))
    except pa.ArrowInvalid as exc:
        raise LakeError(f"unreadable lake part {key}: {exc}") from None


def encode_part(tables: list[pa.Table], *, hour: dt.datetime, generation: str) -> bytes:
    """One lake file: the rows sorted by (device_id, received_at), small row groups with
    statistics, zstd; ``topic`` and ``device_id`` dictionary-encoded."""
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(device_id=device_id_expr()).sort(
        "device_id", "received_at", maintain_order=True, nulls_last=True
    )
    table = frame.to_arrow()
    table = pa.table(
        {name: table.column(name).cast(LAKE_SCHEMA.field(name).type) for name in LAKE_SCHEMA.names},
        schema=LAKE_SCHEMA,
    ).replace_schema_metadata(
        {
            "iot.lake_version": str(LAKE_VERSION),
            "iot.hour": hour.isoformat(),
            "iot.generation": generation,
            "iot.rows": str(table.num_rows),
        }
    )
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        use_dictionary=["topic", "device_id"],
        write_statistics=True,
    )
    return sink.getvalue()


@dataclass(frozen=True)
class CompactionResult:
    hour: dt.datetime
    status: str  # "compacted" | "up to date" | "empty"
    manifest: Manifest | None
    new_batches: int = 0
    previous_parts: int = 0
    removed_parts: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _inputs(
    store: ObjectStore, previous: Manifest | None, late: list[ObjectInfo]
) -> Iterator[tuple[ObjectInfo | None, pa.Table]]:
    """The previous generation's parts (no batch of their own: None), then the new batches,
    read a few at a time in threads (object-store latency, not CPU, bounds a small read)."""
    if previous is not None:
        for part in previous.parts:
            yield None, _read_part_table(store, part.key)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(late), READ_WINDOW):
            window = late[start : start + READ_WINDOW]
            tables = pool.map(lambda info: _read_batch_table(store, info.key), window)
            yield from zip(window, tables, strict=True)


def _groups(
    inputs: Iterator[tuple[ObjectInfo | None, pa.Table]], max_rows: int
) -> Iterator[list[tuple[ObjectInfo | None, pa.Table]]]:
    """Consecutive inputs cut into groups of at most ``max_rows`` (an input is never split;
    one larger than that is a group of its own)."""
    group: list[tuple[ObjectInfo | None, pa.Table]] = []
    rows = 0
    for item in inputs:
        if group and rows + item[1].num_rows > max_rows:
            yield group
            group, rows = [], 0
        group.append(item)
        rows += item[1].num_rows
    if group:
        yield group


def compact_hour(
    store: ObjectStore,
    hour: dt.datetime,
    now: dt.datetime,
    *,
    lateness: dt.timedelta,
    max_rows: int,
) -> CompactionResult:
    """Compact one closed hour (see the module docstring for the rules)."""
    started = time.monotonic()
    hour = hour_start(hour)
    if hour + dt.timedelta(hours=1) + lateness > now:
        raise HourNotClosed(
            f"hour {hour:%Y-%m-%d %H}:00 is compacted from "
            f"{hour + dt.timedelta(hours=1) + lateness:%Y-%m-%d %H:%M} UTC (hour end + "
            f"{lateness.total_seconds():g} s lateness)"
        )
    previous, late = unheld_batches(store, hour)
    held = previous.sources if previous else {}
    if not late:
        status = "up to date" if previous else "empty"
        return CompactionResult(hour, status, previous, seconds=time.monotonic() - started)

    generation = generation_of([*held, *(info.key for info in late)])
    sources = dict(held)
    kept = Digest()  # the previous parts, as read now
    expected = Digest()
    parts: list[Part] = []
    written = Digest()
    try:
        for n, group in enumerate(_groups(_inputs(store, previous, late), max_rows)):
            for (info, _table), digest in zip(group, digests([t for _, t in group]), strict=True):
                expected += digest
                if info is None:
                    kept += digest
                else:
                    sources[info.key] = SourceEntry(info.etag, info.size, digest)
            key = f"{lake_prefix(hour)}part-{generation}-{n:03d}.parquet"
            data = encode_part([t for _, t in group], hour=hour, generation=generation)
            store.put(key, data)
            parts.append(Part(key, sum(t.num_rows for _, t in group), len(data)))
            written += Digest.of(_read_part_table(store, key))  # read back what was stored
        if previous is not None and kept != previous.digest:
            raise LakeError(
                f"the previous lake parts of {hour:%Y-%m-%d %H}:00 no longer match their "
                f"manifest ({kept} != {previous.digest}); nothing was changed. Restore "
                f"them, or, if all {len(held)} micro-batches it holds still exist, delete "
                f"{manifest_key(hour)} to rebuild the hour from them"
            )
        if written != expected:
            raise LakeError(
                f"compacted {hour:%Y-%m-%d %H}:00 does not match its sources: wrote "
                f"{written.rows} rows / {written.hex}, sources {expected.rows} / {expected.hex}"
            )
    except BaseException:
        old = {part.key for part in previous.parts} if previous else set()
        for part in parts:
            if part.key not in old:
                store.delete(part.key)
        raise

    manifest = Manifest(hour, generation, now, expected, tuple(parts), sources)
    store.put(manifest_key(hour), manifest.dumps())  # the commit point
    keep = {part.key for part in parts}
    removed = [i.key for i in store.list(lake_prefix(hour)) if i.key not in keep]
    for key in removed:
        store.delete(key)
    return CompactionResult(
        hour,
        "compacted",
        manifest,
        new_batches=len(late),
        previous_parts=len(previous.parts) if previous else 0,
        removed_parts=removed,
        seconds=time.monotonic() - started,
    )


def hours_needing_compaction(
    store: ObjectStore, now: dt.datetime, *, lateness: dt.timedelta, lookback: dt.timedelta
) -> dict[dt.datetime, list[str]]:
    """Closed hours of the last ``lookback`` with micro-batches no manifest holds (never
    compacted, or late batches since) -> those batches' keys."""
    newest = hour_start(now - lateness) - dt.timedelta(hours=1)
    hour = hour_start(now - lookback)
    out: dict[dt.datetime, list[str]] = {}
    while hour <= newest:
        _manifest, late = unheld_batches(store, hour)
        if late:
            out[hour] = [info.key for info in late]
        hour += dt.timedelta(hours=1)
    return out


@dataclass(frozen=True)
class HourFiles:
    """What a reader scans for one hour: no row twice, none missing."""

    parts: list[str]  # the compacted parts named by the manifest
    batches: list[str]  # micro-batches the manifest does not hold (open or late)


def hour_files(store: ObjectStore, hour: dt.datetime) -> HourFiles:
    """The manifest's parts plus the batches it does not hold (``unheld_batches``)."""
    manifest, batches = unheld_batches(store, hour)
    return HourFiles(
        [part.key for part in manifest.parts] if manifest else [],
        [info.key for info in batches],
    )


def verify_parts(store: ObjectStore, manifest: Manifest) -> Digest:
    """Re-read the hour's parts; raise LakeError unless they match the manifest."""
    found = sum((Digest.of(_read_part_table(store, p.key)) for p in manifest.parts), Digest())
    if found != manifest.digest:
        raise LakeError(
            f"lake parts of {manifest.hour:%Y-%m-%d %H}:00 hold {found.rows} rows / "
            f"{found.hex}, the manifest says {manifest.digest.rows} / {manifest.digest.hex}: "
            "nothing of the hour is deleted; re-compact it from its micro-batches"
        )
    return found


@dataclass
class RetentionReport:
    """What one retention pass did, per reason (Dagster metadata)."""

    deleted: int = 0
    deleted_bytes: int = 0
    hours_scanned: int = 0
    hours_emptied: list[str] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)  # reason -> batches kept
    uncompacted_hours: list[str] = field(default_factory=list)
    late_hours: list[str] = field(default_factory=list)  # compacted, with late batches since
    failed_hours: dict[str, str] = field(default_factory=dict)  # hour -> why nothing deleted

    def keep(self, reason: str, n: int = 1) -> None:
        self.kept[reason] = self.kept.get(reason, 0) + n


LoadedAt = Callable[[str], dict[str, dt.datetime]]  # partition key -> {batch key: loaded_at}


def next_batch_hour(store: ObjectStore, after: dt.datetime | None = None) -> dt.datetime | None:
    """The first hour (after the hour ``after``) that holds a micro-batch: one short listing,
    so a pass skips any run of empty hours in a single step."""
    start_after = hour_prefix(after) + "~" if after else None  # "~" sorts after any key char
    while True:
        page = store.list(KEY_ROOT, start_after=start_after, limit=100)
        for info in page:
            try:
                return hour_start(BatchKey.parse(info.key).first_received_at)
            except RawBatchError:
                continue  # not a batch
        if len(page) < 100:
            return None
        start_after = page[-1].key


def expire_raw_batches(
    store: ObjectStore,
    loaded_at: LoadedAt,
    now: dt.datetime,
    *,
    retention: dt.timedelta,
    max_hours: int = 24 * 7,
) -> RetentionReport:
    """Delete micro-batches that are loaded, compacted and verified, both at least
    ``retention`` ago, hour by hour from the oldest hour that still has any (at most
    ``max_hours`` hours with batches per pass). Everything else stays, counted by the
    reason it stays; hours that need a compaction first are listed."""
    report = RetentionReport()
    cutoff = now - retention
    hour = next_batch_hour(store)
    while hour is not None and hour < hour_start(cutoff) and report.hours_scanned < max_hours:
        name = partition_key(hour)
        listed = list_batches(store, hour)
        current, hour = hour, next_batch_hour(store, hour)
        report.hours_scanned += 1
        manifest = read_manifest(store, current)
        if manifest is None:
            report.uncompacted_hours.append(name)
            report.keep("not compacted", len(listed))
            continue
        if manifest.compacted_at > cutoff:
            report.keep("compacted within the retention", len(listed))
            continue
        loaded = loaded_at(name)
        remaining = len(listed)
        # Verifying re-reads every part of the hour: only once a batch could go.
        verified: bool | None = None
        for info in listed:
            entry = manifest.sources.get(info.key)
            when = loaded.get(info.key)
            if entry is None:
                report.keep("late: not in the compacted hour yet")
                if name not in report.late_hours:
                    report.late_hours.append(name)
            elif when is None:
                report.keep("not loaded")
            elif when > cutoff:
                report.keep("loaded within the retention")
            else:
                if verified is None:
                    verified = _parts_verify(store, manifest, report)
                if not verified:
                    report.keep("lake parts do not verify")
                elif (info.etag, info.size) != (entry.etag, entry.size) and Digest.of(
                    _read_batch_table(store, info.key)
                ) != entry.digest:
                    report.keep("changed since compaction")
                else:
                    store.delete(info.key)
                    report.deleted += 1
                    report.deleted_bytes += info.size
                    remaining -= 1
        if not remaining:
            report.hours_emptied.append(name)
    return report


def _parts_verify(store: ObjectStore, manifest: Manifest, report: RetentionReport) -> bool:
    """Whether the hour's lake parts still verify; a failure is recorded on the report."""
    try:
        verify_parts(store, manifest)
    except (LakeError, ObjectNotFound) as exc:
        report.failed_hours[partition_key(manifest.hour)] = str(exc)
        return False
    return True
