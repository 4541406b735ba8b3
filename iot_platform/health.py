"""Device-health rules: one set-based query per rule, results kept in ``device_health``.

Each rule returns the failing devices with numbers a person can act on. ``evaluate``
writes one ``device_health`` row per registered device and device rule (ok / warn /
error), so the history is queryable even for devices that never fail; the warehouse
retention job keeps that history to IOT_HEALTH_RETENTION_DAYS like every other table's
(``warehouse/retention.py``). A platform rule (``pipeline_lag``) reports the platform itself.
Which clock each rule measures against is part of its definition (README, Device health):
silence is judged against the newest receive time loaded, never the wall clock, so a
lagging pipeline shows as ``pipeline_lag``, not as every device falling silent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from iot_platform.settings import SettingsError, env_float, env_str
from iot_platform.warehouse.aggregates import ROLLUPS, align
from iot_platform.warehouse.migrations import MINUTES_OF_MESSAGES

Bounds = dict[str, tuple[float, float]]  # metric -> (min, max)

# Physical bounds of a metric for a device of any type: the envelope of the v2 protocol's
# device types, so no reading the protocol allows is flagged on a device of unknown type.
METRIC_BOUNDS: Bounds = {
    "voltage_dc": (0.0, 4_000.0),
    "current_dc": (-10_000.0, 10_000.0),
    "power_dc": (-40e6, 40e6),
    "voltage_ac": (0.0, 26_000.0),
    "current_ac": (-2_000.0, 2_000.0),
    "power_ac": (-50e6, 50e6),
    "frequency": (45.0, 65.0),
    "temperature": (-60.0, 150.0),
    "humidity": (0.0, 100.0),
}
# Bounds belong to the device type (DESIGN §11): the v2 protocol's AC meters are 25 kV rail
# meters (24-26 kV); DC traction runs at 600 V to 3 kV nominal, up to about 4 kV.
DEVICE_TYPE_BOUNDS: dict[str, Bounds] = {
    "meter-ac": {"voltage_ac": (24_000.0, 26_000.0)},
    "meter-dc": {"voltage_dc": (0.0, 4_000.0)},
}
BOUNDS_METADATA_KEY = "health_bounds"  # per-device override in devices.metadata
PLATFORM = "(platform)"  # the subject of platform-wide rules; never a valid device id


def _pair(value: object, where: str) -> tuple[float, float]:
    """``[min, max]``: two finite JSON numbers (ints or floats), min <= max, as floats."""
    pair = value if isinstance(value, list) and len(value) == 2 else []
    numbers = bool(pair) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in pair
    )
    try:
        low, high = (float(pair[0]), float(pair[1])) if numbers else (math.nan, math.nan)
    except OverflowError:  # an integer beyond a double
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SettingsError(f"{where} must be [min, max] (two finite numbers), got {value!r}")
    if low > high:
        raise SettingsError(f"{where}: min {low:g} is above max {high:g}")
    return low, high


def parse_metric_bounds(data: object, where: str) -> Bounds:
    """``{"metric": [min, max], ...}``; SettingsError naming ``where`` otherwise."""
    if not isinstance(data, dict):
        raise SettingsError(f'{where} must be a JSON object like {{"metric": [min, max]}}')
    return {str(metric): _pair(value, f"{where}: {metric!r}") for metric, value in data.items()}


@dataclass(frozen=True)
class HealthBounds:
    """Effective bounds: ``generic`` for any device, ``by_type`` for device types that have
    their own (already merged over ``generic``). A device's own override in
    ``devices.metadata`` (``health_bounds``) is applied per device at evaluation."""

    generic: Bounds
    by_type: dict[str, Bounds]

    @classmethod
    def merged(cls, raw: str, name: str = "IOT_HEALTH_BOUNDS") -> HealthBounds:
        """Defaults overlaid with ``raw`` (JSON): ``"metric": [min, max]`` applies to every
        device type, ``"device-type": {"metric": [min, max]}`` to that type only. What is
        not given keeps its default."""
        every: Bounds = {}
        per_type: dict[str, Bounds] = {}
        if raw.strip():
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise SettingsError(f"{name} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise SettingsError(
                    f'{name} must be a JSON object like {{"voltage_ac": [0, 30000]}} or '
                    f'{{"meter-dc": {{"voltage_dc": [0, 4200]}}}}'
                )
            for key, value in data.items():
                if isinstance(value, dict):
                    per_type[key] = parse_metric_bounds(value, f"{name}: device type {key!r}")
                else:
                    every[key] = _pair(value, f"{name}: {key!r}")
        generic = METRIC_BOUNDS | every
        types = DEVICE_TYPE_BOUNDS.keys() | per_type.keys()
        return cls(
            generic=generic,
            by_type={
                t: generic | DEVICE_TYPE_BOUNDS.get(t, {}) | every | per_type.get(t, {})
                for t in sorted(types)
            },
        )


@dataclass(frozen=True)
class HealthSettings:
    window: dt.timedelta
    clock_skew_s: float
    duplicate_rate: float
    reject_rate: float
    bounds: HealthBounds
    pipeline_lag: dt.timedelta
    cert_expiry: dt.timedelta = dt.timedelta(days=30)

    @classmethod
    def from_env(cls) -> HealthSettings:
        """Every IOT_HEALTH_* setting, validated: a bad value raises SettingsError naming it
        (``iot-platform up`` reads them before it starts anything)."""
        return cls(
            window=dt.timedelta(minutes=env_float("IOT_HEALTH_WINDOW_MIN", 60, minimum=1)),
            clock_skew_s=env_float("IOT_HEALTH_CLOCK_SKEW_S", 120, minimum=0),
            duplicate_rate=env_float("IOT_HEALTH_DUPLICATE_RATE", 0.01, minimum=0),
            reject_rate=env_float("IOT_HEALTH_REJECT_RATE", 0.05, minimum=0),
            bounds=HealthBounds.merged(env_str("IOT_HEALTH_BOUNDS", "")),
            cert_expiry=dt.timedelta(days=env_float("IOT_HEALTH_CERT_EXPIRY_DAYS", 30, minimum=0)),
            pipeline_lag=dt.timedelta(
                seconds=env_float("IOT_HEALTH_PIPELINE_LAG_S", 120, minimum=1)
            ),
        )


@dataclass(frozen=True)
class RuleResult:
    rule: str
    severity: str  # what a failure means: "warn" or "error"
    failing: dict[str, dict]  # device_id -> detail
    evaluated: int  # devices looked at

    @property
    def passed(self) -> bool:
        return not self.failing


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    description: str
    query: Callable[[Evaluation], list[tuple[str, dict]]]
    # "device": findings are device ids, with a device_health row per device; "platform":
    # one finding about the platform itself (subject PLATFORM), not blamed on any device.
    scope: str = "device"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the rules: one clock for all of them, and what several rules read
    computed once (``message_totals``: sequence_gaps_duplicates and clock_skew each read
    the window's unsummarised messages, ~1.2 million rows at 10,000 msgs/s, before they
    shared it)."""

    conn: psycopg.Connection
    settings: HealthSettings
    now: dt.datetime

    @property
    def since(self) -> dt.datetime:
        return self.now - self.settings.window

    @cached_property
    def message_totals(self) -> dict[str, list]:
        """Per device over the window, as parallel arrays for an ``unnest`` in SQL:
        messages, distinct seqs summed over its pieces, seq span, whether two pieces' seq
        ranges overlap (then the distinct count is not a sum: recount from raw rows), and
        the largest clock skew."""
        rows = self.conn.execute(
            sql.SQL(
                """
            WITH {pieces},
            ordered AS (
                SELECT *, max(max_seq) OVER (PARTITION BY device_id ORDER BY min_seq, max_seq
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) >= min_seq
                          AS overlapping
                FROM pieces)
            SELECT device_id, sum(messages)::bigint, sum(distinct_seq)::bigint,
                   max(max_seq) - min(min_seq) + 1, coalesce(bool_or(overlapping), false),
                   max(max_skew_s)
            FROM ordered GROUP BY 1 ORDER BY 1
            """
            ).format(pieces=_MESSAGE_PIECES),
            _unreflected_split(self.conn, self.since, "device_messages_1m"),
        ).fetchall()
        columns = ("device", "messages", "distinct_seq", "span", "overlapping", "max_skew")
        return {name: [row[i] for row in rows] for i, name in enumerate(columns)}

    @cached_property
    def devices(self) -> list[str]:
        """The registered devices, read once: every device rule records an outcome for
        each, and all of them for the same devices."""
        return [row[0] for row in self.conn.execute("SELECT device_id FROM devices")]

    def run(self, rule: Rule) -> RuleResult:
        """Run one rule; for a device rule, record its outcome for every registered device."""
        failing = dict(rule.query(self))
        if rule.scope == "platform":
            return RuleResult(rule.name, rule.severity, failing, 1)
        devices = self.devices
        statuses = [rule.severity if d in failing else "ok" for d in devices]
        details = [Jsonb(failing.get(d, {})) for d in devices]
        with self.conn.transaction():
            self.conn.execute(
                """INSERT INTO device_health (checked_at, device_id, check_name, status, detail)
                   SELECT %s, d, %s, s, x
                   FROM unnest(%s::text[], %s::text[], %s::jsonb[]) AS u(d, s, x)""",
                [self.now, rule.name, devices, statuses, details],
            )
        return RuleResult(rule.name, rule.severity, failing, len(devices))


# The per-device message totals as a relation, for the rules that read them.
_TOTALS = """
    totals AS (
        SELECT * FROM unnest(%(device)s::text[], %(messages)s::bigint[],
                             %(distinct_seq)s::bigint[], %(span)s::bigint[],
                             %(overlapping)s::boolean[], %(max_skew)s::numeric[])
            AS t(device_id, messages, distinct_seq, span, overlapping, max_skew_s))"""


def _rows(
    conn: psycopg.Connection, query: str | sql.Composed, params: dict
) -> list[tuple[str, dict]]:
    return [(row[0], row[1]) for row in conn.execute(query, params)]


# Silence is judged against the newest receive time the warehouse holds, not the wall
# clock: while loads lag, every device would otherwise look silent. The lag itself is the
# pipeline_lag rule. Retained replays never move last_seen (warehouse.load).
_NEWEST_RECEIVED = "SELECT least(max(last_seen), %(now)s) AS newest FROM devices"


def _silent(ev: Evaluation) -> list[tuple[str, dict]]:
    return _rows(
        ev.conn,
        f"""
        WITH reference AS ({_NEWEST_RECEIVED})
        SELECT d.device_id, jsonb_build_object(
                   'last_seen', d.last_seen,
                   'silent_for_s', round(extract(epoch FROM r.newest - d.last_seen)::numeric, 1),
                   'limit_s', 2 * greatest(d.send_interval_s, d.hello_interval_s),
                   'judged_against', r.newest,
                   'last_status', st.status,
                   'last_status_received_at', st.received_at)
        FROM devices d CROSS JOIN reference r
        LEFT JOIN LATERAL (
            -- by receive time: a last-will message carries the time the device connected
            SELECT body ->> 'status' AS status, received_at FROM device_events e
            WHERE e.device_id = d.device_id AND e.msg_type = 'status'
            ORDER BY e.received_at DESC, e.ts DESC LIMIT 1) st ON true
        WHERE d.last_seen IS NULL
           OR d.last_seen < r.newest
                - make_interval(secs => 2 * greatest(d.send_interval_s, d.hello_interval_s))
           OR st.status = 'offline'
        ORDER BY 1
        """,  # noqa: S608 - constant SQL
        {"now": ev.now},
    )


def _pipeline_lag(ev: Evaluation) -> list[tuple[str, dict]]:
    return _rows(
        ev.conn,
        f"""
        SELECT %(platform)s, jsonb_build_object(
                   'newest_received_at', newest,
                   'lag_s', round(extract(epoch FROM %(now)s - newest)::numeric, 1),
                   'limit_s', %(limit)s::float8)
        FROM ({_NEWEST_RECEIVED}) r
        WHERE newest < %(now)s - make_interval(secs => %(limit)s::float8)
        """,  # noqa: S608 - constant SQL
        {"now": ev.now, "limit": ev.settings.pipeline_lag.total_seconds(), "platform": PLATFORM},
    )


# Per device and receive minute over the window: device_messages_1m where it reflects every
# message (the whole minutes no unmarked batch touches), the same SELECT over raw
# device_messages for the rest: the window's first, partial minute and the minutes of
# batches loaded since the last refresh (warehouse/message_minutes.py). Its cost follows
# the devices x minutes of the window plus the last minute or two of raw messages, not
# every message of the window (sequence_gaps_duplicates read 36 million rows, 21 s, at
# 10,000 msgs/s and 60 minutes).
_MESSAGE_PIECES = sql.SQL(
    """
    pieces AS (
        SELECT minute, device_id, messages, distinct_seq, min_seq, max_seq, max_skew_s
        FROM device_messages_1m
        WHERE minute >= %(full_from)s
          AND NOT (minute >= %(dirty_from)s AND minute < %(dirty_to)s)
        UNION ALL ({first})
        UNION ALL ({dirty}))"""
).format(
    first=sql.SQL(MINUTES_OF_MESSAGES).format(
        lo=sql.Placeholder("since"), hi=sql.Placeholder("full_from")
    ),
    dirty=sql.SQL(MINUTES_OF_MESSAGES).format(
        lo=sql.SQL("greatest(%(dirty_from)s, %(full_from)s)"), hi=sql.Placeholder("dirty_to")
    ),
)


def _sequence(ev: Evaluation) -> list[tuple[str, dict]]:
    """Distinct seqs add up across the window's minutes while no seq is in two of them (a
    device counting up); a device whose minutes' seq ranges overlap (a restart, a
    redelivery a minute later, several ingest daemons sharing its messages) is counted
    again from its own raw rows of the window: an index-only scan of its entries in the
    (device_id, received_at) index, which covers seq and ts (migration 14)."""
    return _rows(
        ev.conn,
        f"""
        WITH {_TOTALS},
        recounted AS (  -- a lateral loop: each device's own rows, never a scan of all
            SELECT o.device_id, r.messages, r.distinct_seq, r.span
            FROM totals o CROSS JOIN LATERAL (
                SELECT count(*) AS messages, count(DISTINCT seq) AS distinct_seq,
                       max(seq) - min(seq) + 1 AS span
                FROM device_messages m
                WHERE m.device_id = o.device_id AND m.received_at >= %(since)s) r
            WHERE o.overlapping),
        per_device AS (
            SELECT device_id, messages, distinct_seq, span FROM totals WHERE NOT overlapping
            UNION ALL SELECT * FROM recounted)
        SELECT device_id, jsonb_build_object(
                   'messages', messages, 'missing_seq', span - distinct_seq,
                   'duplicates', messages - distinct_seq,
                   'duplicate_rate', round((messages - distinct_seq)::numeric / messages, 4))
        FROM per_device
        WHERE span > distinct_seq
           OR (messages - distinct_seq)::float8 / messages > %(rate)s
        ORDER BY 1
        """,  # noqa: S608 - constant SQL
        ev.message_totals | {"since": ev.since, "rate": ev.settings.duplicate_rate},
    )


def _device_overrides(conn: psycopg.Connection) -> tuple[dict[str, Bounds], dict[str, str]]:
    """Per-device bounds from ``devices.metadata.health_bounds`` (a JSON object, or JSON text
    as ``--meta health_bounds=...`` stores it); and the devices whose override is invalid."""
    overrides: dict[str, Bounds] = {}
    invalid: dict[str, str] = {}
    for device_id, value in conn.execute(
        "SELECT device_id, metadata -> %s FROM devices WHERE metadata ? %s",
        [BOUNDS_METADATA_KEY, BOUNDS_METADATA_KEY],
    ):
        where = f"devices.metadata.{BOUNDS_METADATA_KEY}"
        try:
            data = json.loads(value) if isinstance(value, str) else value
        except ValueError as exc:
            invalid[device_id] = f"{where} is not valid JSON: {exc}"
            continue
        try:
            overrides[device_id] = parse_metric_bounds(data, where)
        except SettingsError as exc:
            invalid[device_id] = str(exc)
    return overrides, invalid


def _bound_rows(subjects: Mapping[str, Bounds] | Mapping[str | None, Bounds]) -> dict[str, list]:
    """Bounds as parallel arrays (key, metric, low, high) for an ``unnest`` in SQL."""
    rows = [(k, m, lo, hi) for k, bounds in subjects.items() for m, (lo, hi) in bounds.items()]
    return {
        "key": [r[0] for r in rows],
        "metric": [r[1] for r in rows],
        "low": [r[2] for r in rows],
        "high": [r[3] for r in rows],
    }


# Per summary, the ledger columns holding each batch's range in the summary's own clock.
_REFLECTED_RANGE = {
    "telemetry_1m": ("refresh_from", "refresh_to"),  # device time (ts)
    "device_messages_1m": ("received_from", "received_to"),  # receive time
}


def _unreflected_split(
    conn: psycopg.Connection, since: dt.datetime, summary: str = "telemetry_1m"
) -> dict:
    """Which part of the window a per-minute summary answers for, as query parameters.

    ``summary`` is ``telemetry_1m`` (by device time: each batch's ts range) or
    ``device_messages_1m`` (by receive time: each batch's received range). A row is
    reflected in either once its batch is marked refreshed
    (``ingest_batches.rollups_refreshed_at``); a reload clears the mark, so every row not
    reflected yet, and every row a reload removed while the summary still counts it, lies
    within its range of an unmarked batch. Returned: those batches (``unrolled``) and the
    union of their ranges, the minute buckets that union touches (``dirty_from`` to
    ``dirty_to``, an empty span when there are none: no summary row there is trusted), the
    bucket holding the window start (``first_bucket``, partly before the window) and where
    the whole buckets begin (``full_from``).
    """
    width = ROLLUPS["telemetry_1m"].width
    low, high = _REFLECTED_RANGE[summary]
    row = conn.execute(
        sql.SQL(
            """SELECT coalesce(array_agg(batch_id), '{{}}'), min({low}), max({high})
               FROM ingest_batches
               WHERE rollups_refreshed_at IS NULL AND {high} >= %s"""
        ).format(low=sql.Identifier(low), high=sql.Identifier(high)),
        [since],
    ).fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    unrolled, unrolled_from, unrolled_to = row
    first_bucket, _ = align(since, since, width)
    dirty_from, dirty_to = (
        align(unrolled_from, unrolled_to, width) if unrolled else (first_bucket, first_bucket)
    )
    return {
        "since": since,
        "width": width,
        "first_bucket": first_bucket,
        "full_from": first_bucket if first_bucket == since else first_bucket + width,
        "unrolled": unrolled,
        "unrolled_from": unrolled_from,
        "unrolled_to": unrolled_to,
        "dirty_from": dirty_from,
        "dirty_to": dirty_to,
    }


def _out_of_range(ev: Evaluation) -> list[tuple[str, dict]]:
    """Per device: its own bounds (metadata), else its type's, else the generic ones.

    A device whose metadata override is invalid is reported with the reason (and judged by
    its type's bounds): an operator mistake is a finding, never a failed evaluation.

    Cost: the window's raw telemetry (rate x window rows: 180 million at 50,000 rows/s and
    60 minutes) is never scanned whole; the minute rollup answers for what it reflects
    (``_unreflected_split``). A first pass finds the (device, metric) pairs that can fail from
    an envelope of the window's values: telemetry_1m's min and max of every bucket that
    overlaps the window, and the raw rows it does not reflect yet (the last minute or so
    under a live load). Every row of the window is in one of the two, so a pair that fails
    has an envelope that fails; the envelope may be wider (a row before the window start
    in its first bucket, a row a reload removed). Each such pair is then judged exactly:
    min and max from the rollup for the whole buckets it can be trusted for, and from raw
    telemetry (through the (device_id, metric, ts) index) for the window's first, partial
    bucket, the buckets of unmarked batches, and the buckets whose own min or max is out
    of bounds, which are also the only buckets that hold the out-of-bounds rows counted.
    """
    conn, bounds = ev.conn, ev.settings.bounds
    overrides, invalid = _device_overrides(conn)
    type_bounds: dict[str | None, Bounds] = {None: bounds.generic}
    type_bounds.update(bounds.by_type.items())
    by_type = _bound_rows(type_bounds)
    own = _bound_rows(overrides)
    found = dict(
        _rows(
            conn,
            """
            WITH type_bounds AS (
                SELECT * FROM unnest(%(t_key)s::text[], %(t_metric)s::text[],
                                     %(t_low)s::float8[], %(t_high)s::float8[])
                    AS b(device_type, metric, low, high)),
            own_bounds AS (
                SELECT * FROM unnest(%(o_key)s::text[], %(o_metric)s::text[],
                                     %(o_low)s::float8[], %(o_high)s::float8[])
                    AS b(device_id, metric, low, high)),
            envelope AS (  -- cheap first pass: only (device, metric) pairs that can fail
                SELECT device_id, metric, min(lo) AS lo, max(hi) AS hi
                FROM (SELECT device_id COLLATE "C" AS device_id, metric COLLATE "C" AS metric,
                             min AS lo, max AS hi
                      FROM telemetry_1m WHERE bucket >= %(first_bucket)s
                      UNION ALL
                      SELECT device_id, metric, min(value), max(value) FROM telemetry
                      WHERE ts >= %(since)s AND ts >= %(unrolled_from)s
                        AND ts <= %(unrolled_to)s AND batch_id = ANY(%(unrolled)s)
                      GROUP BY 1, 2) AS parts
                GROUP BY 1, 2),
            judged AS (
                SELECT x.device_id, x.metric, coalesce(o.low, t.low, g.low) AS low,
                       coalesce(o.high, t.high, g.high) AS high,
                       CASE WHEN o.metric IS NOT NULL THEN 'device metadata'
                            WHEN t.metric IS NOT NULL THEN 'device type ' || d.device_type
                            ELSE 'generic' END AS bounds_from
                FROM envelope x
                JOIN devices d ON d.device_id = x.device_id
                LEFT JOIN own_bounds o ON o.device_id = x.device_id AND o.metric = x.metric
                LEFT JOIN type_bounds t ON t.device_type = d.device_type AND t.metric = x.metric
                LEFT JOIN type_bounds g ON g.device_type IS NULL AND g.metric = x.metric
                WHERE x.lo < coalesce(o.low, t.low, g.low)
                   OR x.hi > coalesce(o.high, t.high, g.high)),
            rollup AS (  -- each judged pair's buckets, flagged where raw rows must be read
                SELECT j.device_id, j.metric, r.bucket, r.min, r.max,
                       r.bucket < %(full_from)s
                           OR (r.bucket >= %(dirty_from)s AND r.bucket < %(dirty_to)s)
                           AS untrusted,
                       r.min < j.low OR r.max > j.high AS out_of_bounds
                FROM judged j JOIN telemetry_1m r
                    ON r.device_id = j.device_id AND r.metric = j.metric
                   AND r.bucket >= %(first_bucket)s),
            raw_buckets AS (  -- disjoint whole buckets; the first one starts at the window
                SELECT device_id, metric, %(first_bucket)s::timestamptz AS bucket FROM judged
                UNION
                SELECT device_id, metric, dirty
                FROM judged CROSS JOIN generate_series(
                    greatest(%(dirty_from)s, %(first_bucket)s), %(dirty_to)s - %(width)s,
                    %(width)s) AS dirty
                UNION
                SELECT device_id, metric, bucket FROM rollup WHERE out_of_bounds),
            raw AS (
                SELECT b.device_id, b.metric, min(n.lo) AS lo, max(n.hi) AS hi,
                       sum(n.rows)::bigint AS rows
                FROM raw_buckets b
                JOIN judged j USING (device_id, metric)
                CROSS JOIN LATERAL (
                    SELECT min(t.value) AS lo, max(t.value) AS hi,
                           count(*) FILTER (WHERE t.value < j.low OR t.value > j.high) AS rows
                    FROM telemetry t
                    WHERE t.device_id = b.device_id AND t.metric = b.metric
                      AND t.ts >= greatest(b.bucket, %(since)s)
                      AND t.ts < b.bucket + %(width)s) n
                GROUP BY 1, 2),
            exact AS (
                SELECT j.*, least(w.lo, r.lo) AS lo, greatest(w.hi, r.hi) AS hi, w.rows
                FROM judged j
                JOIN raw w USING (device_id, metric)
                LEFT JOIN (SELECT device_id, metric, min(min) AS lo, max(max) AS hi
                           FROM rollup WHERE NOT untrusted GROUP BY 1, 2) r
                    USING (device_id, metric))
            SELECT device_id, jsonb_object_agg(metric, jsonb_build_object(
                       'rows', rows, 'min', lo, 'max', hi,
                       'allowed', jsonb_build_array(low, high), 'bounds_from', bounds_from))
            FROM exact WHERE lo < low OR hi > high
            GROUP BY device_id ORDER BY 1
            """,
            _unreflected_split(conn, ev.since)
            | {f"t_{k}": v for k, v in by_type.items()}
            | {f"o_{k}": v for k, v in own.items()},
        )
    )
    for device_id, reason in invalid.items():
        found.setdefault(device_id, {})["invalid_bounds_override"] = reason
    return sorted(found.items())


def _clock_skew(ev: Evaluation) -> list[tuple[str, dict]]:
    """The minutes find the devices with a skewed message; only their raw rows are counted."""
    return _rows(
        ev.conn,
        f"""
        WITH {_TOTALS}
        SELECT t.device_id, jsonb_build_object(
                   'skewed_messages', n.messages, 'max_skew_s', round(n.worst, 1),
                   'limit_s', %(limit)s::float8)
        FROM totals t CROSS JOIN LATERAL (  -- each skewed device's own rows only
            SELECT count(*) AS messages, max(abs(extract(epoch FROM received_at - ts))) AS worst
            FROM device_messages m
            WHERE m.device_id = t.device_id AND m.received_at >= %(since)s
              AND abs(extract(epoch FROM m.received_at - m.ts)) > %(limit)s) n
        WHERE t.max_skew_s > %(limit)s AND n.messages > 0
        ORDER BY 1
        """,  # noqa: S608 - constant SQL
        ev.message_totals | {"since": ev.since, "limit": ev.settings.clock_skew_s},
    )


def _reject_rate(ev: Evaluation) -> list[tuple[str, dict]]:
    return _rows(
        ev.conn,
        """
        WITH by_reason AS (
            SELECT split_part(topic, '/', 2) AS device_id, reason, count(*) AS n
            FROM decode_rejects WHERE received_at >= %(since)s GROUP BY 1, 2),
        rejects AS (
            SELECT device_id, sum(n)::bigint AS n, jsonb_object_agg(reason, n) AS reasons
            FROM by_reason GROUP BY 1),
        good AS (  -- only for devices with rejects: (device_id, received_at) index ranges
            SELECT device_id, count(*) AS n FROM device_messages
            WHERE received_at >= %(since)s AND device_id IN (SELECT device_id FROM rejects)
            GROUP BY 1)
        SELECT r.device_id, jsonb_build_object(
                   'rejects', r.n, 'accepted_messages', coalesce(g.n, 0),
                   'reject_rate', round(r.n::numeric / (r.n + coalesce(g.n, 0)), 4),
                   'reasons', r.reasons)
        FROM rejects r LEFT JOIN good g USING (device_id)
        WHERE r.n::float8 / (r.n + coalesce(g.n, 0)) > %(rate)s
        ORDER BY 1
        """,
        {"since": ev.since, "rate": ev.settings.reject_rate},
    )


def expiring_certificates(ev: Evaluation) -> list[tuple[str, dict]]:
    """Devices whose newest valid certificate expires within the window (a renewal clears it)."""
    return _rows(
        ev.conn,
        """
        SELECT device_id, jsonb_build_object(
                   'not_after', max(not_after),
                   'days_left', round(extract(epoch FROM max(not_after) - %(now)s)::numeric
                                      / 86400, 1))
        FROM device_certificates
        WHERE revoked_at IS NULL AND not_after > %(now)s
        GROUP BY device_id
        HAVING max(not_after) <= %(now)s + %(window)s
        ORDER BY 1
        """,
        {"now": ev.now, "window": ev.settings.cert_expiry},
    )


RULES: tuple[Rule, ...] = (
    Rule(
        "silent_devices",
        "warn",
        "Nothing received from the device for 2 x max(send_interval, hello_interval) before "
        "the newest receive time loaded (not the wall clock), or its latest status by receive "
        "time is offline.",
        _silent,
    ),
    Rule(
        "sequence_gaps_duplicates",
        "warn",
        "Missing telemetry seq numbers, or a duplicate rate above IOT_HEALTH_DUPLICATE_RATE.",
        _sequence,
    ),
    Rule(
        "values_out_of_range",
        "error",
        "Telemetry values in the window outside the device's bounds: its own "
        "(devices.metadata.health_bounds), else its device type's, else the metric's "
        "(IOT_HEALTH_BOUNDS overrides the defaults).",
        _out_of_range,
    ),
    Rule(
        "clock_skew",
        "warn",
        "Device ts differs from receive time by more than IOT_HEALTH_CLOCK_SKEW_S.",
        _clock_skew,
    ),
    Rule(
        "decode_reject_rate",
        "error",
        "Share of a device's messages rejected by the decoder above IOT_HEALTH_REJECT_RATE.",
        _reject_rate,
    ),
    Rule(
        "certificate_expiring",
        "warn",
        "The device's newest valid certificate expires within IOT_HEALTH_CERT_EXPIRY_DAYS.",
        expiring_certificates,
    ),
    Rule(
        "pipeline_lag",
        "warn",
        "The newest receive time loaded into the warehouse is older than "
        "IOT_HEALTH_PIPELINE_LAG_S by the wall clock: ingest or the load runs lag (or the "
        "whole fleet stopped). Reported once, for the platform, not per device.",
        _pipeline_lag,
        scope="platform",
    ),
)


def evaluate(
    conn: psycopg.Connection, rule: Rule, settings: HealthSettings, now: dt.datetime | None = None
) -> RuleResult:
    """Run one rule on its own (``Evaluation.run`` runs several on one clock)."""
    return Evaluation(conn, settings, now or dt.datetime.now(dt.UTC)).run(rule)
