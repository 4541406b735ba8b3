"""The v2 envelope family (``iot/{id}/...``, DESIGN §5): which fields each kind of
message carries, and the ordered checks that turn parsed envelopes into telemetry,
messages and events.

Payloads are read by the JSON engine (``json_engine``) against this module's field specs,
one group (telemetry, status, other events) at a time; its slow path reports fields of the
wrong JSON type as pre-classified issues, which ``_pre`` slots into the check order here,
so a message gets the same verdict whichever path parsed it. Event payloads are parsed
``strict``: they are stored verbatim as jsonb bodies."""

from __future__ import annotations

from typing import Any

import polars as pl

from iot_platform.decode.collector import Collector, first_failure, out_of_range, show
from iot_platform.decode.json_engine import (
    INT,
    LIST,
    NUM,
    SELF,
    STR,
    JsonEngineLimits,
    RecordSpec,
    parse_batch,
)
from iot_platform.decode.schema import (
    MAX_ABS_VALUE,
    MAX_MEASUREMENTS,
    MAX_SEQ,
    METRIC_PATTERN,
    MSG_TYPE_PATTERN,
    UNIT_PATTERN,
    TsWindow,
)
from iot_platform.decode.schema import RejectReason as R

# ---- v2 envelope field specs: the single source for the Arrow schema and diagnosis ----
_ENVELOPE: tuple[tuple[str, str], ...] = (
    ("v", INT),
    ("device_id", STR),
    ("ts", STR),
    ("seq", INT),
    ("msg_type", STR),
)
_MEASUREMENT: tuple[tuple[str, str], ...] = (
    ("type", STR),
    ("val", NUM),
    ("ts", STR),
    ("unit", STR),
)
_GROUP_SPECS: dict[str, RecordSpec] = {
    "telemetry": RecordSpec(
        (*_ENVELOPE, ("measurements", LIST)), items=_MEASUREMENT, max_items=MAX_MEASUREMENTS
    ),
    "status": RecordSpec((*_ENVELOPE, ("status", STR))),
    "event": RecordSpec(_ENVELOPE),
}
_TS_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:?\d{2})?$"
_LEAP_SECOND = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:60"


def decode_v2(
    rows: pl.DataFrame, out: Collector, ts_window: TsWindow, limits: JsonEngineLimits
) -> None:
    group_of = (
        pl.when(pl.col("kind") == "telemetry")
        .then(pl.lit("telemetry"))
        .when(pl.col("kind") == "status")
        .then(pl.lit("status"))
        .otherwise(pl.lit("event"))
    )
    rows = rows.with_columns(_group=group_of)
    for group in ("telemetry", "status", "event"):
        part = rows.filter(pl.col("_group") == group)
        if not part.height:
            continue
        parsed, env_issues, meas_issues = _parse_group(part, group, out, limits)
        if not parsed.height:
            continue
        envelopes = _check_envelopes(parsed, env_issues, group, out, ts_window)
        if group == "telemetry":
            _emit_telemetry(envelopes, meas_issues, out, ts_window)
        else:
            _emit_events(envelopes, out)


def _parse_group(
    rows: pl.DataFrame, group: str, out: Collector, limits: JsonEngineLimits
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Parse one group's payloads (``parse_batch``). Returns (parsed rows joined to
    ``rows``, envelope issues, measurement issues); rows that cannot be parsed at all are
    rejected into ``out``."""
    spec = _GROUP_SPECS[group]
    batch = parse_batch(
        rows.get_column("text"),
        rows.get_column("_row"),
        rows.get_column("size"),
        spec,
        strict=group != "telemetry",
        limits=limits,
    )
    out.reject(
        pl.DataFrame(
            batch.rejected, schema={"_row": pl.Int64, "reason": pl.String, "detail": pl.String}
        )
    )
    if batch.parsed is None:
        return pl.DataFrame(), pl.DataFrame(), pl.DataFrame()
    parsed = batch.parsed.join(rows.drop("payload"), on="_row", how="inner")
    # a ``v`` beyond 64 bits is no version this decoder speaks, not a range problem
    env_issues = [
        {**issue, "reason": R.UNSUPPORTED_VERSION}
        if issue["field"] == "v" and issue["reason"] == R.VALUE_OUT_OF_RANGE
        else issue
        for issue in batch.issues
    ]
    env = _pivot_issues(env_issues, ["_row"], [SELF, *[f for f, _ in spec.fields]])
    meas = _pivot_issues(batch.item_issues, ["_row", "_pos"], [SELF, *[f for f, _ in _MEASUREMENT]])
    return parsed.sort("_row"), env, meas


def _parse_ts(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> Datetime(us, UTC); null when it does not parse."""
    text = expr.str.replace(r"^(\d{4}-\d{2}-\d{2})[Tt ]", "${1}T").str.replace(r"[Zz]$", "+00:00")
    text = pl.when(text.str.contains(r"[+-]\d{2}:?\d{2}$")).then(text).otherwise(text + "+00:00")
    parsed = text.str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", time_zone="UTC", strict=False
    )
    return pl.when(expr.str.contains(_TS_PATTERN)).then(parsed).otherwise(None)


def _with_ts(frame: pl.DataFrame, source: str, target: str) -> pl.DataFrame:
    """Add ``target`` = ``source`` parsed by _parse_ts. Timestamps repeat a lot (one per
    envelope, shared by its measurements), so each distinct text is parsed once, the
    common ``...Z`` form by the fast direct format."""
    keys = frame.get_column(source).drop_nulls().unique().to_frame("_key")
    fast = pl.col("_key").str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=False
    )
    ok = pl.col("_key").str.contains(_TS_PATTERN) & ~pl.col("_key").str.contains(_LEAP_SECOND)
    table = keys.with_columns(_ok=ok, _parsed=fast)
    slow = table.filter(pl.col("_ok") & pl.col("_parsed").is_null())
    if slow.height:
        table = pl.concat(
            [
                table.filter(~(pl.col("_ok") & pl.col("_parsed").is_null())),
                slow.with_columns(_parsed=_parse_ts(pl.col("_key"))),
            ]
        )
    table = table.select("_key", pl.when("_ok").then("_parsed").otherwise(None).alias(target))
    return frame.join(table, left_on=source, right_on="_key", how="left", maintain_order="left")


def _ts_checks(
    text: pl.Expr, parsed: pl.Expr, where: pl.Expr, window: TsWindow, *, check_age: bool = True
) -> list[tuple[pl.Expr, Any, Any]]:
    """The checks of a present ``ts`` (``text``) parsed as ``parsed``: leap second, format,
    plausibility against ``received_at``. ``where`` names the field in the details."""
    received = pl.col("received_at")
    shown = received.dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
    checks: list[tuple[pl.Expr, Any, Any]] = [
        (
            text.str.contains(_LEAP_SECOND),
            R.TS_OUT_OF_RANGE,
            pl.format("{} '{}' is a leap second, which is not supported", where, show(text)),
        ),
        (
            text.is_not_null() & parsed.is_null(),
            R.WRONG_TYPE,
            pl.format("{} '{}' is not an ISO 8601 date-time", where, show(text)),
        ),
        (
            parsed > received + window.ahead,
            R.TS_OUT_OF_RANGE,
            pl.format(
                "{} '{}' is more than {} after receive time {}",
                where,
                show(text),
                pl.lit(str(window.ahead)),
                shown,
            ),
        ),
    ]
    if check_age:
        checks.append(
            (
                parsed < received - window.age,
                R.TS_OUT_OF_RANGE,
                pl.format(
                    "{} '{}' is more than {} before receive time {}",
                    where,
                    show(text),
                    pl.lit(str(window.age)),
                    shown,
                ),
            )
        )
    return checks


def _pivot_issues(issues: list[dict[str, Any]], keys: list[str], fields: list[str]) -> pl.DataFrame:
    """One row per key, columns _pr_{field} (reason) and _pd_{field} (detail)."""
    table: dict[tuple[int, ...], dict[str, Any]] = {}
    for issue in issues:
        key = tuple(issue[k] for k in keys)
        entry = table.setdefault(key, dict(zip(keys, key, strict=True)))
        entry[f"_pr_{issue['field']}"] = str(issue["reason"])
        entry[f"_pd_{issue['field']}"] = issue["detail"]
    schema: dict[str, Any] = dict.fromkeys(keys, pl.Int64)
    for field in fields:
        schema[f"_pr_{field}"] = pl.String
        schema[f"_pd_{field}"] = pl.String
    return pl.DataFrame(list(table.values()), schema=schema)


def _with_issues(frame: pl.DataFrame, issues: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    if issues.height:
        return frame.join(issues, on=keys, how="left", maintain_order="left")
    extra = [pl.lit(None, pl.String).alias(c) for c in issues.columns if c not in keys]
    return frame.with_columns(extra)


def _pre(field: str) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """The check that applies an issue classified by the slow path to ``field``."""
    return (pl.col(f"_pr_{field}").is_not_null(), pl.col(f"_pr_{field}"), pl.col(f"_pd_{field}"))


# ---- vectorised envelope checks ----------------------------------------------------------
def _check_envelopes(
    parsed: pl.DataFrame, env_issues: pl.DataFrame, group: str, out: Collector, window: TsWindow
) -> pl.DataFrame:
    frame = _with_ts(_with_issues(parsed, env_issues, ["_row"]), "ts", "_ts")
    v, device, ts, seq, msg_type = (pl.col(c) for c in ("v", "device_id", "ts", "seq", "msg_type"))
    seq_required = group != "status"
    checks: list[tuple[pl.Expr, Any, Any]] = [
        _pre(SELF),
        (pl.col("_pnull"), R.WRONG_TYPE, pl.lit("payload is null, expected a JSON object")),
        _pre("v"),
        (v.is_null(), R.MISSING_FIELD, pl.lit("missing field 'v'")),
        (v != 2, R.UNSUPPORTED_VERSION, pl.format("v is {}, only v=2 is supported", v)),
        _pre("device_id"),
        (device.is_null(), R.MISSING_FIELD, pl.lit("missing field 'device_id'")),
        (
            device != pl.col("topic_device"),
            R.DEVICE_ID_MISMATCH,
            pl.format(
                "payload device_id '{}' differs from the topic's device id '{}'",
                show(device),
                pl.col("topic_device"),
            ),
        ),
        _pre("ts"),
        (ts.is_null(), R.MISSING_FIELD, pl.lit("missing field 'ts'")),
        *_ts_checks(ts, pl.col("_ts"), pl.lit("ts"), window, check_age=group != "status"),
        _pre("seq"),
        (
            seq.is_null() & pl.lit(seq_required),
            R.MISSING_FIELD,
            pl.lit("missing field 'seq'"),
        ),
        (
            (seq < 0) | (seq > MAX_SEQ),
            R.VALUE_OUT_OF_RANGE,
            pl.format("seq {} is outside 0..{}", seq, pl.lit(MAX_SEQ)),
        ),
        _pre("msg_type"),
    ]
    if group == "telemetry":
        count = pl.col("measurements").list.len()
        checks += [
            (
                msg_type.is_not_null() & (msg_type != "telemetry"),
                R.WRONG_TYPE,
                pl.format("msg_type '{}' on a telemetry topic", show(msg_type)),
            ),
            _pre("measurements"),
            (
                pl.col("measurements").is_null(),
                R.MISSING_FIELD,
                pl.lit("missing field 'measurements'"),
            ),
            (
                count > MAX_MEASUREMENTS,
                R.TOO_MANY_MEASUREMENTS,
                pl.format("{} measurements, limit is {}", count, pl.lit(MAX_MEASUREMENTS)),
            ),
        ]
    else:
        checks.append(
            (
                msg_type.is_not_null() & ~msg_type.str.contains(MSG_TYPE_PATTERN),
                R.WRONG_TYPE,
                pl.format(
                    "msg_type '{}' does not match {}", show(msg_type), pl.lit(MSG_TYPE_PATTERN)
                ),
            )
        )
    if group == "status":
        status = pl.col("status")
        checks += [
            _pre("status"),
            (status.is_null(), R.MISSING_FIELD, pl.lit("missing field 'status'")),
            (
                ~status.is_in(["online", "offline"]),
                R.WRONG_TYPE,
                pl.format("status '{}' is neither 'online' nor 'offline'", show(status)),
            ),
        ]
    accepted = out.reject_where(frame, checks)
    msg = msg_type.fill_null(pl.col("kind")) if group != "telemetry" else pl.lit("telemetry")
    accepted = accepted.with_columns(_msg_type=msg)
    seq_rows = accepted.filter(pl.col("seq").is_not_null())
    out.messages.append(
        seq_rows.select(
            "_row",
            device_id=pl.col("topic_device"),
            seq="seq",
            ts="_ts",
            received_at="received_at",
            msg_type="_msg_type",
        )
    )
    return accepted


def _emit_events(envelopes: pl.DataFrame, out: Collector) -> None:
    out.events.append(
        envelopes.select(
            "_row",
            ts="_ts",
            device_id="topic_device",
            msg_type="_msg_type",
            seq="seq",
            body="text",
            received_at="received_at",
        )
    )


def _emit_telemetry(
    envelopes: pl.DataFrame, meas_issues: pl.DataFrame, out: Collector, window: TsWindow
) -> None:
    # duplicate envelopes (device_id, seq): the first received wins (rows sorted by _row)
    envelopes = envelopes.sort("_row").with_columns(
        _dup=~pl.struct("topic_device", "seq").is_first_distinct()
    )
    items = (
        envelopes.select(
            "_row",
            "_dup",
            "topic_device",
            "seq",
            "received_at",
            "_ts",
            m="measurements",
            _pos=pl.int_ranges(0, pl.col("measurements").list.len(), dtype=pl.Int64),
        )
        .explode("m", "_pos")
        .filter(pl.col("_pos").is_not_null())
        .with_columns(_mnull=pl.col("m").is_null())
        .unnest("m")
    )
    items = _with_ts(_with_issues(items, meas_issues, ["_row", "_pos"]), "ts", "_mts")
    pos = pl.col("_pos")
    where = pl.format("measurements[{}]", pos)
    mtype, val, mts, unit = pl.col("type"), pl.col("val"), pl.col("ts"), pl.col("unit")
    checks: list[tuple[pl.Expr, Any, Any]] = [
        _pre(SELF),
        (pl.col("_mnull"), R.WRONG_TYPE, pl.format("{} is null, expected an object", where)),
        _pre("type"),
        (mtype.is_null(), R.MISSING_FIELD, pl.format("{}: missing field 'type'", where)),
        (
            ~mtype.str.contains(METRIC_PATTERN),
            R.WRONG_TYPE,
            pl.format("{}.type '{}' is not a valid metric name", where, show(mtype)),
        ),
        _pre("val"),
        (val.is_null(), R.MISSING_FIELD, pl.format("{}: missing field 'val'", where)),
        (
            out_of_range(val),
            R.VALUE_OUT_OF_RANGE,
            pl.format(
                "{}.val {} is NaN, infinite or beyond ±{}", where, val, pl.lit(f"{MAX_ABS_VALUE:g}")
            ),
        ),
        _pre("ts"),
        *_ts_checks(mts, pl.col("_mts"), pl.format("{}.ts", where), window),
        _pre("unit"),
        (
            unit.is_not_null() & ~unit.str.contains(UNIT_PATTERN),
            R.WRONG_TYPE,
            pl.format("{}.unit '{}' is not a valid unit", where, show(unit, 40)),
        ),
    ]
    reason, detail = first_failure(checks)
    items = items.with_columns(_reason=reason, _detail=detail)
    kept = items.filter(~pl.col("_dup"))
    out.duplicates += items.filter(pl.col("_dup") & pl.col("_reason").is_null()).height

    bad = kept.filter(pl.col("_reason").is_not_null())
    if bad.height:
        totals = kept.group_by("_row").agg(_total=pl.len())
        summary = (
            bad.sort("_row", "_pos")
            .group_by("_row", maintain_order=True)
            .agg(
                reason=pl.col("_reason").first(),
                _n=pl.len(),
                _first=pl.col("_detail").head(5).str.join("; "),
            )
            .join(totals, on="_row", how="left")
            .with_columns(
                detail=pl.format(
                    "{} of {} measurements dropped: {}{}",
                    pl.col("_n"),
                    pl.col("_total"),
                    pl.col("_first"),
                    pl.when(pl.col("_n") > 5)
                    .then(pl.format("; ... {} more", pl.col("_n") - 5))
                    .otherwise(pl.lit("")),
                )
            )
        )
        out.reject(summary)

    good = kept.filter(pl.col("_reason").is_null())
    out.telemetry.append(
        good.select(
            "_row",
            "_pos",
            ts=pl.coalesce("_mts", "_ts"),
            device_id="topic_device",
            metric="type",
            value="val",
            unit="unit",
            received_at="received_at",
            seq="seq",
        )
    )
