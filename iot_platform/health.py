"""Device-health rules: one set-based query per rule, results kept in ``device_health``.

Each rule returns the failing devices with numbers a person can act on. ``evaluate``
writes one ``device_health`` row per registered device and rule (ok / warn / error), so
the history is queryable even for devices that never fail.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from iot_platform.settings import SettingsError, env_float, env_str

# Sane physical bounds for the metrics the simulator and the v2 meters send; extend with
# IOT_HEALTH_BOUNDS='{"metric": [min, max], ...}'.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "voltage_dc": (0, 1500),
    "current_dc": (-500, 500),
    "power_dc": (-750_000, 750_000),
    "voltage_ac": (0, 480),
    "current_ac": (-500, 500),
    "power_ac": (-250_000, 250_000),
    "frequency": (45, 65),
    "temperature": (-60, 150),
    "humidity": (0, 100),
}


@dataclass(frozen=True)
class HealthSettings:
    window: dt.timedelta
    clock_skew_s: float
    duplicate_rate: float
    reject_rate: float
    bounds: dict[str, tuple[float, float]]
    cert_expiry: dt.timedelta = dt.timedelta(days=30)

    @classmethod
    def from_env(cls) -> HealthSettings:
        bounds = dict(DEFAULT_BOUNDS)
        raw = env_str("IOT_HEALTH_BOUNDS", "")
        if raw:
            try:
                bounds.update({k: (float(v[0]), float(v[1])) for k, v in json.loads(raw).items()})
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise SettingsError(
                    f'IOT_HEALTH_BOUNDS must be JSON like {{"metric": [min, max]}}: {exc}'
                ) from None
        return cls(
            window=dt.timedelta(minutes=env_float("IOT_HEALTH_WINDOW_MIN", 60, minimum=1)),
            clock_skew_s=env_float("IOT_HEALTH_CLOCK_SKEW_S", 120, minimum=0),
            duplicate_rate=env_float("IOT_HEALTH_DUPLICATE_RATE", 0.01, minimum=0),
            reject_rate=env_float("IOT_HEALTH_REJECT_RATE", 0.05, minimum=0),
            bounds=bounds,
            cert_expiry=dt.timedelta(days=env_float("IOT_HEALTH_CERT_EXPIRY_DAYS", 30, minimum=0)),
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
    query: Callable[[psycopg.Connection, HealthSettings, dt.datetime], list[tuple[str, dict]]]
    blocking: bool = False
    tags: dict[str, str] = field(default_factory=dict)


def _rows(conn: psycopg.Connection, query: str, params: dict) -> list[tuple[str, dict]]:
    return [(row[0], row[1]) for row in conn.execute(query, params)]


def _silent(conn, s: HealthSettings, now: dt.datetime) -> list[tuple[str, dict]]:
    return _rows(
        conn,
        """
        SELECT d.device_id, jsonb_build_object(
                   'last_seen', d.last_seen,
                   'silent_for_s', round(extract(epoch FROM %(now)s - d.last_seen)::numeric, 1),
                   'limit_s', 2 * greatest(d.send_interval_s, d.hello_interval_s),
                   'last_status', st.status)
        FROM devices d
        LEFT JOIN LATERAL (
            SELECT body ->> 'status' AS status FROM device_events e
            WHERE e.device_id = d.device_id AND e.msg_type = 'status'
            ORDER BY e.ts DESC LIMIT 1) st ON true
        WHERE d.last_seen IS NULL
           OR d.last_seen < %(now)s
                - make_interval(secs => 2 * greatest(d.send_interval_s, d.hello_interval_s))
           OR st.status = 'offline'
        ORDER BY 1
        """,
        {"now": now},
    )


def _sequence(conn, s: HealthSettings, now: dt.datetime) -> list[tuple[str, dict]]:
    return _rows(
        conn,
        """
        WITH per_device AS (
            SELECT device_id, count(*) AS messages, count(DISTINCT seq) AS distinct_seq,
                   max(seq) - min(seq) + 1 AS span
            FROM device_messages
            WHERE received_at >= %(since)s  -- seq counts every v2 message of a device
            GROUP BY device_id)
        SELECT device_id, jsonb_build_object(
                   'messages', messages, 'missing_seq', span - distinct_seq,
                   'duplicates', messages - distinct_seq,
                   'duplicate_rate', round((messages - distinct_seq)::numeric / messages, 4))
        FROM per_device
        WHERE span > distinct_seq
           OR (messages - distinct_seq)::float8 / messages > %(rate)s
        ORDER BY 1
        """,
        {"since": now - s.window, "rate": s.duplicate_rate},
    )


def _out_of_range(conn, s: HealthSettings, now: dt.datetime) -> list[tuple[str, dict]]:
    metrics = list(s.bounds)
    return _rows(
        conn,
        """
        WITH bounds AS (
            SELECT * FROM unnest(%(metrics)s::text[], %(low)s::float8[], %(high)s::float8[])
                AS b(metric, low, high))
        SELECT t.device_id, jsonb_object_agg(t.metric, jsonb_build_object(
                   'rows', t.n, 'min', t.lo, 'max', t.hi, 'allowed', jsonb_build_array(low, high)))
        FROM (SELECT device_id, metric, count(*) AS n, min(value) AS lo, max(value) AS hi
              FROM telemetry JOIN bounds USING (metric)
              WHERE ts >= %(since)s AND (value < low OR value > high)
              GROUP BY device_id, metric) t
        JOIN bounds USING (metric)
        GROUP BY t.device_id ORDER BY 1
        """,
        {
            "since": now - s.window,
            "metrics": metrics,
            "low": [s.bounds[m][0] for m in metrics],
            "high": [s.bounds[m][1] for m in metrics],
        },
    )


def _clock_skew(conn, s: HealthSettings, now: dt.datetime) -> list[tuple[str, dict]]:
    return _rows(
        conn,
        """
        SELECT device_id, jsonb_build_object(
                   'skewed_messages', count(*),
                   'max_skew_s', round(max(abs(extract(epoch FROM received_at - ts)))::numeric, 1),
                   'limit_s', %(limit)s::float8)
        FROM device_messages
        WHERE received_at >= %(since)s
          AND abs(extract(epoch FROM received_at - ts)) > %(limit)s
        GROUP BY device_id ORDER BY 1
        """,
        {"since": now - s.window, "limit": s.clock_skew_s},
    )


def _reject_rate(conn, s: HealthSettings, now: dt.datetime) -> list[tuple[str, dict]]:
    return _rows(
        conn,
        """
        WITH by_reason AS (
            SELECT split_part(topic, '/', 2) AS device_id, reason, count(*) AS n
            FROM decode_rejects WHERE received_at >= %(since)s GROUP BY 1, 2),
        rejects AS (
            SELECT device_id, sum(n)::bigint AS n, jsonb_object_agg(reason, n) AS reasons
            FROM by_reason GROUP BY 1),
        good AS (
            SELECT device_id, count(*) AS n FROM device_messages
            WHERE received_at >= %(since)s GROUP BY 1)
        SELECT r.device_id, jsonb_build_object(
                   'rejects', r.n, 'accepted_messages', coalesce(g.n, 0),
                   'reject_rate', round(r.n::numeric / (r.n + coalesce(g.n, 0)), 4),
                   'reasons', r.reasons)
        FROM rejects r LEFT JOIN good g USING (device_id)
        WHERE r.n::float8 / (r.n + coalesce(g.n, 0)) > %(rate)s
        ORDER BY 1
        """,
        {"since": now - s.window, "rate": s.reject_rate},
    )


def expiring_certificates(
    conn: psycopg.Connection, s: HealthSettings, now: dt.datetime
) -> list[tuple[str, dict]]:
    """Devices whose newest valid certificate expires within the window (a renewal clears it)."""
    return _rows(
        conn,
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
        {"now": now, "window": s.cert_expiry},
    )


RULES: tuple[Rule, ...] = (
    Rule(
        "silent_devices",
        "warn",
        "No data for 2 x max(send_interval, hello_interval), or the LWT said offline.",
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
        "Telemetry values outside the metric's physical bounds (IOT_HEALTH_BOUNDS).",
        _out_of_range,
        blocking=True,
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
)


def evaluate(
    conn: psycopg.Connection, rule: Rule, settings: HealthSettings, now: dt.datetime | None = None
) -> RuleResult:
    """Run one rule and record its outcome for every registered device."""
    now = now or dt.datetime.now(dt.UTC)
    failing = dict(rule.query(conn, settings, now))
    devices = [row[0] for row in conn.execute("SELECT device_id FROM devices")]
    statuses = [rule.severity if d in failing else "ok" for d in devices]
    details = [Jsonb(failing.get(d, {})) for d in devices]
    with conn.transaction():
        conn.execute(
            """INSERT INTO device_health (checked_at, device_id, check_name, status, detail)
               SELECT %s, d, %s, s, x
               FROM unnest(%s::text[], %s::text[], %s::jsonb[]) AS u(d, s, x)""",
            [now, rule.name, devices, statuses, details],
        )
    return RuleResult(rule.name, rule.severity, failing, len(devices))
