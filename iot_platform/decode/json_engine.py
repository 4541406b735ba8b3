"""A strict, batched JSON reader: many payloads in, typed columns (or exact per-row
diagnoses) out. It knows JSON and the shape the caller asks for (a ``RecordSpec``), not
what the fields mean; the family rules (``v2``) decide that from what it returns.

How JSON is parsed
------------------
All payloads of one batch are parsed together by Arrow's JSON reader with an explicit,
strict schema (a string where a number belongs, a float where an integer belongs, a
boolean anywhere typed, ... fail the parse). Each payload is wrapped as
``{"_i":N,"p":<payload>}`` so output rows provably line up with input rows, and the plain
newline-joined payloads are parsed once more to prove each payload is exactly one JSON
value (no trailing garbage). In ``strict`` mode (payloads stored verbatim as ``jsonb``
bodies) they are additionally held to Polars' strict parser (no NaN/Infinity) and may not
contain ``\\u0000``. Only when a parse fails is the input split into
``JsonEngineLimits.split_parts`` parts and parsed again; the rows of parts that still fail
are examined one by one with ``json.loads`` (the slow path) and either rejected outright
(bad syntax, not an object, duplicate keys) or *repaired*: rebuilt from the fields the
spec names, a field of the wrong JSON type nulled and remembered as a pre-classified
issue. Repaired rows go back through the vectorised parse, so the caller applies its one
ordered list of checks to every row. So a well-formed batch never touches Python per row,
and a batch full of bad rows costs one ``json.loads`` per row rather than a re-parse per
bisection level.

The batch sizes that trade memory against re-parsing are ``JsonEngineLimits``, passed in
explicitly (tests pass tiny ones to drive every path with a few rows).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.json as pajson

from iot_platform.decode.schema import RejectReason as R

# JSON kinds of the fields a RecordSpec names
INT, STR, NUM, LIST = "integer", "string", "number", "list"
SELF = "_self"  # pseudo field: the object / list item itself (JSON null, not an object)
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException,
    pl.exceptions.PolarsError,
    pl.exceptions.PanicException,
)
_ARROW_KIND = {INT: pa.int64(), STR: pa.string(), NUM: pa.float64()}
_EMPTY_SCHEMA = pa.schema([])
_ISOLATE_LEAF = 8
_MAX_FLOAT_INT = 2**1023  # ints at or beyond this overflow a double (treated as infinite)
_NUL_ESCAPE = r"(?:^|[^\\])(?:\\\\)*\\u0000"


@dataclass(frozen=True)
class JsonEngineLimits:
    """How the engine cuts a batch. ``chunk_bytes``: payload bytes parsed as one Arrow
    block (bounds memory). A failing chunk of more than ``split_min_rows`` rows is split
    into ``split_parts`` parts parsed again; smaller failing runs go to the slow path.
    From ``parallel_min_rows`` rows on, the one-value-per-payload proof runs in a worker
    thread beside the typed parse."""

    chunk_bytes: int = 32 * 1024 * 1024
    split_min_rows: int = 256
    split_parts: int = 16
    parallel_min_rows: int = 256


DEFAULT_JSON_LIMITS = JsonEngineLimits()


@dataclass(frozen=True)
class RecordSpec:
    """The fields read from each payload (a JSON object), each with its JSON kind. At most
    one field is a ``LIST``, of objects with the ``items`` fields; a list longer than
    ``max_items`` is not examined item by item (the caller's count check refuses it)."""

    fields: tuple[tuple[str, str], ...]
    items: tuple[tuple[str, str], ...] = ()
    max_items: int = 0

    @property
    def list_field(self) -> str | None:
        return next((field for field, kind in self.fields if kind == LIST), None)


@functools.cache
def wrapped_schema(spec: RecordSpec) -> pa.Schema:
    """The Arrow schema of ``{"_i": N, "p": <payload>}`` lines for ``spec``."""

    def arrow_type(kind: str) -> pa.DataType:
        if kind == LIST:
            return pa.list_(pa.struct([(f, _ARROW_KIND[k]) for f, k in spec.items]))
        return _ARROW_KIND[kind]

    payload = pa.struct([(f, arrow_type(k)) for f, k in spec.fields])
    return pa.schema([("_i", pa.int64()), ("p", payload)])


# ---- isolating failures -------------------------------------------------------------------
def isolate_failures(series: pl.Series, ok: Callable[[pl.Series], bool]) -> list[int]:
    """Positions of the rows for which ``ok`` fails, found by bisection."""
    return [lo for lo, _ in _bisect(series.len(), lambda lo, hi: ok(series.slice(lo, hi - lo)))[1]]


def _bisect(
    n: int, attempt: Callable[[int, int], Any]
) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """Run ``attempt(lo, hi)`` on [0, n); where it fails (returns a falsy value or a
    ``(None, why)`` pair) split the range, down to single rows. Returns the successful
    ``[(lo, result)]`` and the failing single rows ``[(position, why)]``."""
    good: list[tuple[int, Any]] = []
    bad: list[tuple[int, Any]] = []
    stack = [(0, n)] if n else []
    while stack:
        lo, hi = stack.pop()
        result = attempt(lo, hi)
        failed = not result or (isinstance(result, tuple) and result[0] is None)
        if not failed:
            good.append((lo, result))
        elif hi - lo == 1:
            bad.append((lo, result[1] if isinstance(result, tuple) else ""))
        elif hi - lo <= _ISOLATE_LEAF:
            stack.extend((i, i + 1) for i in reversed(range(lo, hi)))
        else:
            mid = (lo + hi) // 2
            stack.extend(((mid, hi), (lo, mid)))
    return good, sorted(bad)


# ---- one batch: fast path, slow path, re-parse of the repaired rows -----------------------
@dataclass(frozen=True)
class ParsedBatch:
    """What ``parse_batch`` made of a batch, keyed by the caller's row ids (``_row``).
    ``parsed``: ``_row``, ``_pnull`` (the payload is JSON null) and the spec's fields of
    every row that parsed, None if none did. ``issues`` (_row, field, reason, detail) and
    ``item_issues`` (_row, _pos, field, reason, detail): fields the slow path found of the
    wrong JSON type and nulled. ``rejected`` (_row, reason, detail): unusable payloads."""

    parsed: pl.DataFrame | None
    issues: list[dict[str, Any]]
    item_issues: list[dict[str, Any]]
    rejected: list[dict[str, Any]]


def parse_batch(
    texts: pl.Series,
    row_ids: pl.Series,
    sizes: pl.Series,
    spec: RecordSpec,
    *,
    strict: bool,
    limits: JsonEngineLimits,
) -> ParsedBatch:
    """Parse ``texts`` (payload byte ``sizes``) as ``spec`` records.

    Fast path: one vectorised parse per chunk. If a chunk fails, it is split into up to
    ``limits.split_parts`` parts that are parsed again; the rows of parts that still fail
    take the slow path (``_diagnose``: json.loads per row). Bisecting further costs a
    re-parse per level, which with bad rows spread through a batch is far slower than the
    slow path."""
    schema = wrapped_schema(spec)
    parsed_parts: list[pl.DataFrame] = []
    slow: list[int] = []
    for start, stop in byte_chunks(sizes, limits.chunk_bytes):
        arr, _ = _try_parse(texts.slice(start, stop - start), schema, strict, limits)
        if arr is not None:
            parsed_parts.append(_struct_frame(row_ids.slice(start, stop - start), arr))
            continue
        n = stop - start
        if n <= limits.split_min_rows:
            slow.extend(range(start, stop))
            continue
        step = max(limits.split_min_rows, -(-n // limits.split_parts))
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            arr, _ = _try_parse(texts.slice(lo, hi - lo), schema, strict, limits)
            if arr is not None:
                parsed_parts.append(_struct_frame(row_ids.slice(lo, hi - lo), arr))
            else:
                slow.extend(range(lo, hi))

    issues: list[dict[str, Any]] = []
    item_issues: list[dict[str, Any]] = []
    retry: dict[bool, tuple[list[int], list[str]]] = {True: ([], []), False: ([], [])}
    rejected: list[dict[str, Any]] = []
    for i in slow:  # the slow path: only rows of parts that failed the vectorised parse
        row = int(row_ids[i])
        result = _diagnose(texts[i], spec, strict)
        if isinstance(result, _Rejected):
            rejected.append({"_row": row, "reason": result.reason, "detail": result.detail})
            continue
        issues += [
            {"_row": row, "field": f, "reason": r, "detail": d} for f, (r, d) in result.env.items()
        ]
        item_issues += [
            {"_row": row, "_pos": pos, "field": f, "reason": r, "detail": d}
            for (pos, f), (r, d) in result.items.items()
        ]
        # strict payloads are stored verbatim: a clean one is parsed again as received (and
        # must pass the strict parsers); anything else is parsed as repaired
        original = strict and not result.env
        retry[original][0].append(row)
        retry[original][1].append(texts[i] if original else result.text)
    for original, (ids, again) in retry.items():
        if not ids:
            continue
        texts_again = pl.Series("text", again, dtype=pl.String)
        good, bad = _parse_isolating(texts_again, schema, original, limits)
        parsed_parts += [_struct_frame(ids[lo : lo + len(arr)], arr) for lo, arr in good]
        rejected += [
            {
                "_row": ids[i],
                "reason": R.MALFORMED_JSON,
                "detail": f"payload refused by the JSON parser: {err}",
            }
            for i, err in bad
        ]
    parsed = pl.concat(parsed_parts, how="vertical") if parsed_parts else None
    return ParsedBatch(parsed, issues, item_issues, rejected)


def byte_chunks(sizes: pl.Series, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split rows into runs that start within the same ``chunk_bytes`` window (so a run
    holds at most that plus one row), each parsed as one Arrow block."""
    cost = sizes.cast(pl.Int64) + 64
    if cost.sum() <= chunk_bytes:
        return [(0, sizes.len())]
    window = (cost.cum_sum() - cost) // chunk_bytes
    starts = (window != window.shift(1)).fill_null(True).arg_true().to_list()
    return list(itertools.pairwise([*starts, sizes.len()]))


def _struct_frame(row_ids: pl.Series | list[int], parsed: pa.Array) -> pl.DataFrame:
    """Parsed ``p`` structs -> columns, with their ``_row`` ids."""
    payload = pl.from_arrow(parsed)
    assert isinstance(payload, pl.Series) and payload.len() == len(row_ids)
    rows = pl.Series("_row", row_ids, dtype=pl.Int64)
    return (
        pl.DataFrame({"_row": rows, "p": payload})
        .with_columns(_pnull=pl.col("p").is_null())
        .unnest("p")
    )


# ---- vectorised parsing -----------------------------------------------------------------
def _parse_isolating(
    texts: pl.Series, schema: pa.Schema, strict: bool, limits: JsonEngineLimits
) -> tuple[list[tuple[int, pa.Array]], list[tuple[int, str]]]:
    """Parse all texts at once; where that fails, bisect. Returns ([(first position,
    parsed structs of a contiguous run)], [(position, error) of each unparseable row])."""

    def attempt(lo: int, hi: int) -> tuple[pa.Array | None, str]:
        return _try_parse(texts.slice(lo, hi - lo), schema, strict, limits)

    good, bad = _bisect(texts.len(), attempt)
    return [(lo, result[0]) for lo, result in good], bad


def _read_json(data: bytes, schema: pa.Schema) -> pa.Table:
    return pajson.read_json(
        pa.BufferReader(data),
        read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 64),
        parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore"
        ),
    )


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else repr(exc)


def _count_values(data: bytes) -> int | str:
    """How many JSON values ``data`` holds, or why it does not parse."""
    try:
        # pyarrow 26 segfaults when the first value of the input is a top-level ``null``:
        # a leading ``{}`` sentinel keeps hostile payloads away from that position
        return _read_json(b"{}\n" + data, _EMPTY_SCHEMA).num_rows - 1
    except PARSE_ERRORS as exc:
        return _error_text(exc)


_executors: dict[int, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()


def _background(fn: Callable[[bytes], int | str], data: bytes) -> Future[int | str]:
    """Run ``fn(data)`` on this process's worker thread (one per pid: an executor
    inherited through fork has no threads and would never run the work)."""
    with _executor_lock:
        executor = _executors.get(os.getpid())
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iot-decode")
            _executors.clear()
            _executors[os.getpid()] = executor
    return executor.submit(fn, data)


def _try_parse(
    texts: pl.Series, schema: pa.Schema, strict: bool, limits: JsonEngineLimits
) -> tuple[pa.Array | None, str]:
    """Parse ``texts`` in one go. Either (the ``p`` structs aligned with ``texts``, "") or
    (None, why): a failure of any row fails the whole call."""
    n = texts.len()
    if n == 0:
        return pa.array([], type=schema.field("p").type), ""
    # 1. exactly one JSON value per payload: a value spanning payloads or trailing garbage
    #    fails this parse or changes the count. Arrow releases the GIL: for big inputs it
    #    runs in a worker thread while this thread does the typed parse.
    plain = texts.str.join("\n").item().encode()
    pending = _background(_count_values, plain) if n >= limits.parallel_min_rows else None
    table: pa.Table | None = None
    error = ""
    try:
        # 2. the typed parse; the wrapper proves row i of the output is payload i
        wrapped = (
            pl.DataFrame({"t": texts})
            .select(
                pl.concat_str(
                    pl.lit('{"_i":'),
                    pl.int_range(n).cast(pl.String),
                    pl.lit(',"p":'),
                    pl.col("t"),
                    pl.lit("}"),
                ).str.join("\n")
            )
            .item()
            .encode()
        )
        table = _read_json(wrapped, schema)
        index = pl.Series(table.column("_i").combine_chunks())
        if table.num_rows != n or not index.equals(
            pl.int_range(0, n, eager=True), check_names=False
        ):
            table, error = None, "payload rows are misaligned"
        # 3. strict payloads are stored as jsonb: strict JSON (no NaN/Infinity), no \u0000
        elif strict and texts.str.json_decode(pl.Struct({})).len() != n:
            table, error = None, "payload is not a single JSON value"
        elif strict and texts.str.contains(_NUL_ESCAPE).any():
            table, error = None, "payload contains \\u0000, which cannot be stored as jsonb"
        elif strict and not all(map(_strictly_valid, texts)):
            table, error = None, "a payload has a duplicate key or an overflowing number"
    except PARSE_ERRORS as exc:
        table, error = None, _error_text(exc)
    values = pending.result() if pending is not None else _count_values(plain)
    if isinstance(values, str):
        return None, values
    if values != n:
        return None, f"{values} JSON values in {n} payloads"
    if table is None:
        return None, error
    return table.column("p").combine_chunks(), ""


def _strictly_valid(text: str) -> bool:
    """A strict payload passes the strict decoder: no duplicate key at any level (Arrow
    and Polars keep the last value silently), no number beyond a double. One C-speed
    json.loads per payload; strict payloads (events) are a small share of the traffic."""
    try:
        _STRICT_DECODER.decode(text)
    except (ValueError, RecursionError):
        return False
    return True


# ---- the slow path: diagnose one payload that failed the vectorised parse ----------------
@dataclass(frozen=True)
class _Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class _Repaired:
    text: str
    env: dict[str, tuple[str, str]]
    items: dict[tuple[int, str], tuple[str, str]]


class _DuplicateKeyError(ValueError):
    pass


class _Object(dict[str, Any]):
    """A JSON object read by the slow path; ``duplicates``: its keys that occur twice."""

    duplicates: frozenset[str] = frozenset()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _noting_duplicate_keys(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        obj.duplicates = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


class _HugeInt:
    """An integer literal too long for ``int()`` (Python's 4300-digit limit). Beyond the
    range of every field, so it gets the same verdict as any too large integer instead of
    failing the whole payload with Python's own error text."""


_HUGE_INT = _HugeInt()
_INT_DIGITS = 4000  # below sys.get_int_max_str_digits() (4300), sign included


def _parse_int(text: str) -> int | _HugeInt:
    return int(text) if len(text) <= _INT_DIGITS else _HUGE_INT


def _parse_strict_int(text: str) -> int:
    """Strict payloads are stored as jsonb and must pass the strict parsers, which read
    numbers as doubles: an integer that overflows a double is refused like ``1e400``."""
    value = _parse_int(text)
    if isinstance(value, _HugeInt) or not -_MAX_FLOAT_INT < value < _MAX_FLOAT_INT:
        raise ValueError("a number overflows a double")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Lenient (telemetry): duplicates matter only for the fields the decoder reads (the body
# is not stored), exactly as the vectorised parser sees it. Strict (events): stored
# verbatim, so any duplicate key anywhere is refused (jsonb would silently keep the last).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_noting_duplicate_keys, parse_constant=float, parse_int=_parse_int
)
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys,
    parse_constant=_refuse_constant,
    parse_int=_parse_strict_int,
)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | _HugeInt):
        return "an integer"
    if isinstance(value, float):
        return "a non-integer number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _kind_issue(value: Any, kind: str, escapes: bool) -> tuple[str, str] | None:
    """Why ``value`` (not None) cannot be stored as ``kind`` (JSON type rules), or None.
    The detail follows the field name. ``escapes``: the payload has ``\\u`` escapes, so a
    string may hold a lone surrogate."""
    of = type(value)
    if kind == STR:
        if of is not str:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected a string"
        if escapes:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return R.WRONG_TYPE, "is not valid Unicode (lone surrogate escape)"
        return None
    if of is _HugeInt and kind in (INT, NUM):
        if kind == INT:
            return R.VALUE_OUT_OF_RANGE, "does not fit in 64 bits"
        return R.VALUE_OUT_OF_RANGE, "is not a finite number"
    if kind == INT:
        if of is not int:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected an integer"
        if not -(2**63) <= value < 2**63:
            return R.VALUE_OUT_OF_RANGE, "does not fit in 64 bits"
        return None
    if kind == NUM:
        if of is float:
            finite = math.isfinite(value)
        elif of is int:
            finite = -_MAX_FLOAT_INT < value < _MAX_FLOAT_INT
        else:
            return R.WRONG_TYPE, f"is {_json_type(value)}, expected a number"
        return None if finite else (R.VALUE_OUT_OF_RANGE, "is not a finite number")
    if of is not list:
        return R.WRONG_TYPE, f"is {_json_type(value)}, expected an array"
    return None


def _diagnose(text: str, spec: RecordSpec, strict: bool) -> _Rejected | _Repaired:
    """The slow path for one payload: reject it (not JSON, not an object), or rebuild it
    from the fields the spec names, with each badly typed field nulled and its issue
    remembered, so the caller's vectorised checks decide in their usual order."""
    try:
        obj = (_STRICT_DECODER if strict else _DECODER).decode(text)
    except _DuplicateKeyError as exc:
        return _Rejected(R.MALFORMED_JSON, f"duplicate key {str(exc)[:64]!r}")
    except RecursionError:
        return _Rejected(R.MALFORMED_JSON, "JSON nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError, NaN in strict mode, int digit limit
        return _Rejected(R.MALFORMED_JSON, f"invalid JSON: {str(exc)[:160]}")
    if not isinstance(obj, dict):
        return _Rejected(R.WRONG_TYPE, f"payload is {_json_type(obj)}, expected a JSON object")
    if strict and (problem := _jsonb_problem(obj)):
        return _Rejected(R.MALFORMED_JSON, problem)
    if not strict and (duplicate := _read_duplicate(obj, spec)):
        return _Rejected(R.MALFORMED_JSON, f"duplicate key {duplicate[:64]!r}")
    env: dict[str, tuple[str, str]] = {}
    items: dict[tuple[int, str], tuple[str, str]] = {}
    repaired: dict[str, Any] = {}
    escapes = "\\u" in text
    for field, kind in spec.fields:
        value = obj.get(field)
        issue = None if value is None else _kind_issue(value, kind, escapes)
        if issue:
            env[field] = (issue[0], f"{field} {issue[1]}")
            value = None
        if kind == LIST and value is not None:
            value = _repair_items(field, value, spec, items, escapes)
        repaired[field] = value
    try:
        return _Repaired(json.dumps(repaired, ensure_ascii=False, allow_nan=False), env, items)
    except ValueError as exc:
        return _Rejected(R.MALFORMED_JSON, f"payload could not be decoded: {exc}")


def _read_duplicate(obj: dict[str, Any], spec: RecordSpec) -> str | None:
    """A duplicated key among the fields the spec names (top level, list items), or None:
    the ones the vectorised parser refuses too, whichever path a payload takes."""
    envelope = {field for field, _ in spec.fields}
    for key in sorted(getattr(obj, "duplicates", frozenset[str]()) & envelope):
        return key
    name = spec.list_field
    items = obj.get(name) if name is not None else None
    if isinstance(items, list):
        fields = {field for field, _ in spec.items}
        for item in items:
            for key in sorted(getattr(item, "duplicates", frozenset[str]()) & fields):
                return key
    return None


def _jsonb_problem(obj: dict[str, Any]) -> str | None:
    """Why a strict payload, stored verbatim as a jsonb body, cannot be stored (what the
    strict parsers refuse beyond json.loads), or None."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except ValueError as exc:  # a number that overflows a double; UnicodeEncodeError
        if isinstance(exc, UnicodeEncodeError):
            return "invalid \\u escape (lone surrogate)"
        return "a number overflows a double"
    except RecursionError:
        return "JSON nested too deeply"
    if "\\u0000" in text and re.search(_NUL_ESCAPE, text):  # dumps escapes NUL as \u0000
        return "contains \\u0000, which cannot be stored as jsonb"
    return None


def _repair_items(
    name: str,
    items: list[Any],
    spec: RecordSpec,
    issues: dict[tuple[int, str], tuple[str, str]],
    escapes: bool,
) -> list[Any]:
    if len(items) > spec.max_items:
        return [None] * len(items)  # rejected as a whole by the caller's count check
    repaired: list[Any] = []
    for pos, item in enumerate(items):
        if not isinstance(item, dict):
            issues[(pos, SELF)] = (
                R.WRONG_TYPE,
                f"{name}[{pos}] is {_json_type(item)}, expected an object",
            )
            repaired.append(None)
            continue
        fixed: dict[str, Any] = {}
        for field, kind in spec.items:
            value = item.get(field)
            of = type(value)
            if (  # the common cases inline, without the per-field call below
                value is None
                or (of is str and kind == STR and not escapes)
                or (of is float and kind == NUM and math.isfinite(value))
                or (of is int and kind == NUM and -_MAX_FLOAT_INT < value < _MAX_FLOAT_INT)
            ):
                fixed[field] = value
                continue
            if issue := _kind_issue(value, kind, escapes):
                issues[(pos, field)] = (issue[0], f"{name}[{pos}].{field} {issue[1]}")
                value = None
            fixed[field] = value
        repaired.append(fixed)
    return repaired
