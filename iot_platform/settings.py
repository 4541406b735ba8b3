"""Platform settings: every environment variable the platform reads, in one place.

Each setting has a safe local default for the embedded stack. Secrets may be given
inline (``NAME``) or as a path (``NAME_FILE``, e.g. a Docker/Kubernetes secret);
they are never logged (see ``Secret.__repr__``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CRL_REFRESH_HOURS = 6  # crl_refresh_schedule's period
# The one place that state and certificate paths resolve from when IOT_HOME /
# IOT_CERTS_DIR are not set: the source checkout this package runs from (it holds
# workspace.yaml), never the current folder, so `iot-platform` finds the embedded stack's
# state and certificates from any folder.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MQTT_MAX_PACKET_BYTES = 268_435_455  # the largest remaining length MQTT can encode


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Secret:
    """A secret value that does not print itself."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def env_dir(name: str, default: Path | None) -> Path:
    """An absolute directory from ``name``, else ``default`` (None: no default here).

    A relative value is refused: it would mean another folder for every working directory
    the operator runs a command from."""
    raw = os.environ.get(name, "").strip()
    if raw:
        if not Path(raw).is_absolute():
            raise SettingsError(
                f"{name}={raw!r} is a relative path: give an absolute one (relative paths "
                "would depend on the folder a command runs from)"
            )
        return Path(raw).resolve()
    if default is None:
        raise SettingsError(
            f"set {name}: iot_platform does not run from a source checkout "
            f"({PROJECT_ROOT} has no workspace.yaml), so it has no default"
        )
    return default


def checkout_dir(name: str) -> Path | None:
    """``PROJECT_ROOT/name`` when running from a source checkout, else None."""
    return PROJECT_ROOT / name if (PROJECT_ROOT / "workspace.yaml").is_file() else None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false)")


def env_secret(name: str) -> Secret | None:
    """Read ``NAME`` or, if unset, the file named by ``NAME_FILE`` (trailing newline stripped)."""
    inline = os.environ.get(name)
    if inline:
        return Secret(inline)
    path = os.environ.get(f"{name}_FILE", "").strip()
    return Secret(_read_secret_file(name, path)) if path else None


def _read_secret_file(name: str, path: str) -> str:
    """The secret in the file ``NAME_FILE`` names (one trailing newline is not part of it)."""
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None


# Every secret the platform's processes read (each also as NAME_FILE). Dagster reads some of
# them itself — dagster.yaml's storage password, the resources' dg.EnvVar — and neither
# knows the NAME_FILE form; `iot-platform exec` hands them over (see exec_environment).
SECRET_SETTINGS = (
    "IOT_PG_PASSWORD",
    "IOT_CA_PASSPHRASE",
    "IOT_S3_ACCESS_KEY",
    "IOT_S3_SECRET_KEY",
    "IOT_GRAFANA_DB_PASSWORD",
    "IOT_ALERT_WEBHOOK_TOKEN",
    "IOT_ALERT_SLACK_TOKEN",
    "IOT_DAGSTER_AUTH_HEADER",
)


def exec_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with each ``NAME_FILE`` of ``SECRET_SETTINGS`` read into ``NAME``.

    For Docker/Kubernetes secrets mounted as files: a container's configured environment
    then holds only paths (``docker inspect`` shows no secret), and the process that needs
    the value gets it in its own environment when it starts.
    """
    env = dict(environ)
    for name in SECRET_SETTINGS:
        path = env.pop(f"{name}_FILE", "").strip()
        if path and not env.get(name):
            env[name] = _read_secret_file(name, path)
    return env


def dagster_auth_header() -> Secret | None:
    """``IOT_DAGSTER_AUTH_HEADER`` / ``_FILE``: the ``Authorization`` value (``Bearer <token>``,
    ``Basic <base64>``) the operator CLI sends to the authenticating proxy in front of a
    remote webserver. Dagster's own UI and GraphQL API have no login."""
    return env_secret("IOT_DAGSTER_AUTH_HEADER")


def require_secret(name: str) -> Secret:
    secret = env_secret(name)
    if secret is None:
        raise SettingsError(f"set {name} or {name}_FILE")
    return secret


WAREHOUSE_DIALECTS = ("auto", "timescaledb", "postgresql")


def warehouse_dialect_setting() -> str:
    """``IOT_WAREHOUSE_DIALECT``: ``auto`` uses TimescaleDB wherever the server has it,
    ``timescaledb`` insists on it (an error names what is missing), ``postgresql`` never
    loads it. Read by the embedded server (what to preload) and by the migration."""
    value = env_str("IOT_WAREHOUSE_DIALECT", "auto").lower()
    if value not in WAREHOUSE_DIALECTS:
        raise SettingsError(
            f"IOT_WAREHOUSE_DIALECT={value!r} must be one of {', '.join(WAREHOUSE_DIALECTS)}"
        )
    return value


def crl_url_setting() -> str:
    """``IOT_CRL_URL``: the CRL distribution point written into every certificate the CA
    issues, where ``iot-platform crl serve`` answers (EMQX fetches the CRL from it), or ""
    (unset: no distribution point, as before; Mosquitto reads the CRL file either way)."""
    url = env_str("IOT_CRL_URL", "")
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(
            f"IOT_CRL_URL={url!r} must be an http:// or https:// URL with a host, "
            "e.g. http://iot-crl.iot.svc.cluster.local:8088/crl.der"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SettingsError(
            f"IOT_CRL_URL={url!r}: no credentials, query or fragment (every certificate "
            "carries it and every broker fetches it as it is)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise SettingsError(f"IOT_CRL_URL={url!r} has an invalid port") from None
    return url


def ts_max_age_s() -> float:
    """``IOT_TS_MAX_AGE_S``: the oldest device time accepted, and how long a (device_id,
    seq) stays claimed against duplicates."""
    return env_float("IOT_TS_MAX_AGE_S", 7 * 86_400, minimum=60)


def health_retention_days() -> float:
    """``IOT_HEALTH_RETENTION_DAYS``: ``device_health`` history kept (health evaluation and
    the retention pass both prune to it)."""
    return env_float("IOT_HEALTH_RETENTION_DAYS", 30, minimum=1)


def _retention_days(name: str, default: float) -> float | None:
    """Days to keep (fractions allowed); 0 keeps forever (None)."""
    days = env_float(name, default, minimum=0)
    return days or None


def _keeps_longer(a: float | None, b: float | None) -> bool:
    """Whether a retention ``a`` keeps at least as long as ``b`` (None is forever)."""
    return a is None or (b is not None and a >= b)


@dataclass(frozen=True)
class RetentionSettings:
    """How long each growing warehouse table keeps its rows (in days; None = forever).

    Rules checked here, so a bad combination fails at start-up with the variables named:
    a rollup keeps at least as long as its source (``telemetry`` <= ``_1m`` <= ``_1h`` <=
    ``_1d``): a refresh over a window whose source was dropped would empty the rollup
    there. The load ledger (``ingest_batches`` and ``device_messages``) makes loads
    idempotent and de-duplicates on (device_id, seq), so it keeps at least the claim window
    (IOT_TS_MAX_AGE_S) — and must outlive the raw micro-batches, which can be reloaded as
    long as they exist (a batch reloaded after its ledger row is gone would load its events
    a second time).
    """

    telemetry: float | None
    telemetry_1m: float | None
    telemetry_1h: float | None
    telemetry_1d: float | None
    device_events: float | None
    decode_rejects: float | None
    device_health: float
    ledger: float | None
    telemetry_compress_after: float
    batch_rows: int
    max_seconds: float

    @classmethod
    def from_env(cls) -> RetentionSettings:
        settings = cls(
            telemetry=_retention_days("IOT_RETENTION_TELEMETRY_DAYS", 30),
            telemetry_1m=_retention_days("IOT_RETENTION_TELEMETRY_1M_DAYS", 90),
            telemetry_1h=_retention_days("IOT_RETENTION_TELEMETRY_1H_DAYS", 730),
            telemetry_1d=_retention_days("IOT_RETENTION_TELEMETRY_1D_DAYS", 0),
            device_events=_retention_days("IOT_RETENTION_DEVICE_EVENTS_DAYS", 90),
            decode_rejects=_retention_days("IOT_RETENTION_DECODE_REJECTS_DAYS", 30),
            device_health=health_retention_days(),
            ledger=_retention_days("IOT_RETENTION_LEDGER_DAYS", 30),
            telemetry_compress_after=env_float(
                "IOT_TELEMETRY_COMPRESS_AFTER_DAYS", 7, minimum=0.04
            ),
            batch_rows=env_int("IOT_RETENTION_BATCH_ROWS", 10_000, minimum=1),
            max_seconds=env_float("IOT_RETENTION_MAX_SECONDS", 120, minimum=1),
        )
        chain = [
            ("IOT_RETENTION_TELEMETRY_DAYS", settings.telemetry),
            ("IOT_RETENTION_TELEMETRY_1M_DAYS", settings.telemetry_1m),
            ("IOT_RETENTION_TELEMETRY_1H_DAYS", settings.telemetry_1h),
            ("IOT_RETENTION_TELEMETRY_1D_DAYS", settings.telemetry_1d),
        ]
        for (source, kept), (rollup, rollup_kept) in itertools.pairwise(chain):
            if not _keeps_longer(rollup_kept, kept):
                raise SettingsError(
                    f"{rollup}={rollup_kept or 0:g} keeps less than {source}={kept or 0:g}: "
                    "a rollup must keep at least as long as its source (0 = forever)"
                )
        claim_days = ts_max_age_s() / 86_400
        if not _keeps_longer(settings.ledger, claim_days):
            raise SettingsError(
                f"IOT_RETENTION_LEDGER_DAYS={settings.ledger:g} is shorter than the "
                f"de-duplication window IOT_TS_MAX_AGE_S ({claim_days:g} days)"
            )
        return settings


@dataclass(frozen=True)
class PlatformSettings:
    """Non-secret platform settings. Secrets are read on demand with ``env_secret``."""

    home: Path
    certs_dir: Path
    broker_host: str
    broker_port: int
    broker_service_name: str
    broker_max_inflight: int
    broker_max_queued: int
    crl_days: int
    crl_min_remaining_hours: float
    crl_url: str
    device_cert_days: int
    allow_server_keygen: bool
    pg_host: str
    pg_port: int
    pg_user: str
    pg_database: str
    dagster_database: str
    dagster_host: str
    dagster_port: int
    dagster_url: str
    object_store: str
    local_store_dir: Path
    s3_endpoint: str
    s3_bucket: str
    s3_secure: bool
    s3_timeout_s: float
    simulator_devices: int
    simulator_interval_s: float
    simulator_faults: tuple[str, ...]
    mqtt_max_payload_bytes: int
    ts_max_ahead_s: float
    ts_max_age_s: float
    warehouse_dialect: str

    @classmethod
    def from_env(cls) -> PlatformSettings:
        home = env_dir("IOT_HOME", checkout_dir(".iot"))
        crl_days = env_int("IOT_CRL_DAYS", 7, minimum=1)
        crl_margin = env_float("IOT_CRL_MIN_REMAINING_HOURS", 48, minimum=0)
        if crl_days * 24 <= crl_margin + CRL_REFRESH_HOURS:
            raise SettingsError(
                f"IOT_CRL_DAYS={crl_days} leaves no room for IOT_CRL_MIN_REMAINING_HOURS="
                f"{crl_margin:g} plus the {CRL_REFRESH_HOURS} h refresh period: the CRL "
                "check would always fail"
            )
        mqtt_max_payload = env_int("IOT_MQTT_MAX_PAYLOAD_BYTES", 1024 * 1024, minimum=1)
        if mqtt_max_payload > MQTT_MAX_PACKET_BYTES:
            raise SettingsError(
                f"IOT_MQTT_MAX_PAYLOAD_BYTES={mqtt_max_payload} exceeds what MQTT can carry "
                f"({MQTT_MAX_PACKET_BYTES})"
            )
        object_store = env_str("IOT_OBJECT_STORE", "local")
        if object_store not in {"local", "s3"}:
            raise SettingsError(f"IOT_OBJECT_STORE={object_store!r} must be 'local' or 's3'")
        dagster_host = env_str("IOT_DAGSTER_HOST", "127.0.0.1")
        dagster_port = env_int("IOT_DAGSTER_PORT", 3000, minimum=1)
        # Where the operator CLI reaches the webserver: the local one, or an authenticating
        # proxy in front of a remote one (docs/kubernetes.md), e.g. https://dagster.example/
        dagster_url = env_str("IOT_DAGSTER_URL", f"http://{dagster_host}:{dagster_port}")
        url = urlsplit(dagster_url)
        if url.scheme not in {"http", "https"} or not url.hostname or url.query or url.username:
            raise SettingsError(
                f"IOT_DAGSTER_URL={dagster_url!r} must be http(s)://host[:port][/path] "
                "(credentials go in IOT_DAGSTER_AUTH_HEADER_FILE, never in the URL)"
            )
        return cls(
            home=home,
            certs_dir=env_dir("IOT_CERTS_DIR", checkout_dir("certs")),
            broker_host=env_str("IOT_BROKER_HOST", "127.0.0.1"),
            broker_port=env_int("IOT_BROKER_PORT", 8883, minimum=1),
            broker_service_name=env_str("IOT_BROKER_SERVICE_NAME", "mosquitto"),
            broker_max_inflight=env_int("IOT_BROKER_MAX_INFLIGHT", 50_000, minimum=0),
            broker_max_queued=env_int("IOT_BROKER_MAX_QUEUED", 1_000_000, minimum=0),
            crl_days=crl_days,
            crl_min_remaining_hours=crl_margin,
            crl_url=crl_url_setting(),
            device_cert_days=env_int("IOT_DEVICE_CERT_DAYS", 365, minimum=1),
            allow_server_keygen=env_bool("IOT_ALLOW_SERVER_KEYGEN", False),
            pg_host=env_str("IOT_PG_HOST", "127.0.0.1"),
            pg_port=env_int("IOT_PG_PORT", 54329, minimum=1),
            pg_user=env_str("IOT_PG_USER", "iot"),
            pg_database=env_str("IOT_PG_DB", "iot"),
            dagster_database=env_str("IOT_DAGSTER_DB", "dagster"),
            dagster_host=dagster_host,
            dagster_port=dagster_port,
            dagster_url=dagster_url.rstrip("/"),
            object_store=object_store,
            local_store_dir=env_dir("IOT_LOCAL_STORE_DIR", home / "objects"),
            s3_endpoint=env_str("IOT_S3_ENDPOINT", "127.0.0.1:9000"),
            s3_bucket=env_str("IOT_S3_BUCKET", "iot-raw"),
            s3_secure=env_bool("IOT_S3_SECURE", False),
            s3_timeout_s=env_float("IOT_S3_TIMEOUT_S", 10.0, minimum=0.5),
            simulator_devices=env_int("IOT_SIMULATOR_DEVICES", 4, minimum=0),
            simulator_interval_s=env_float("IOT_SIMULATOR_INTERVAL_S", 10.0, minimum=0.1),
            # One visibly faulty device by default, so the health checks have something
            # to flag: device 1 (a meter-ac) reports timestamps ~10 minutes off.
            simulator_faults=tuple(env_str("IOT_SIMULATOR_FAULTS", "1=skew").split()),
            # The one payload limit: the broker refuses larger publishes (a v5 device sees
            # the reason code) and the ingest daemon keeps everything the broker delivers.
            mqtt_max_payload_bytes=mqtt_max_payload,
            # Device time vs receive time (decoder: ts_out_of_range outside this window).
            ts_max_ahead_s=env_float("IOT_TS_MAX_AHEAD_S", 86_400, minimum=0),
            ts_max_age_s=ts_max_age_s(),
            warehouse_dialect=warehouse_dialect_setting(),
        )


@dataclass(frozen=True)
class AlertSettings:
    """Where notifications about health-check transitions go (``iot_platform.alerts``).

    Non-secret settings only: the webhook token and the Slack token are read with
    ``env_secret`` when a message is sent, so they never enter resource config, run
    config or the UI. No channel configured means the alert sensor tracks transitions
    and says so in its tick, without sending anything."""

    webhook_url: str
    slack_channel: str
    slack_api_url: str
    timeout_s: float

    @classmethod
    def from_env(cls) -> AlertSettings:
        webhook_url = env_str("IOT_ALERT_WEBHOOK_URL", "")
        slack_api_url = env_str("IOT_ALERT_SLACK_API_URL", "https://slack.com/api/")
        for name, url in (
            ("IOT_ALERT_WEBHOOK_URL", webhook_url),
            ("IOT_ALERT_SLACK_API_URL", slack_api_url),
        ):
            if url and not url.startswith(("http://", "https://")):
                # not echoed: a webhook URL may carry a secret in its path
                raise SettingsError(f"{name} must be an http:// or https:// URL")
        return cls(
            webhook_url=webhook_url,
            slack_channel=env_str("IOT_ALERT_SLACK_CHANNEL", "#iot-alerts"),
            slack_api_url=slack_api_url if slack_api_url.endswith("/") else slack_api_url + "/",
            timeout_s=env_float("IOT_ALERT_TIMEOUT_S", 10.0, minimum=0.5),
        )


@dataclass(frozen=True)
class LakeSettings:
    """The compacted raw lake and the raw micro-batches' lifecycle (``iot_platform.lake``).

    An hour is compacted once it closed ``lateness_s`` ago; micro-batches are deleted only
    once loaded, compacted, verified and ``raw_retention_hours`` old. The load ledger must
    outlive them (``RetentionSettings``): a raw batch without its ledger row is never
    deleted, and would be loaded a second time if it were reloaded."""

    lateness_s: float
    file_max_rows: int
    lookback_hours: int
    raw_retention_hours: float

    @classmethod
    def from_env(cls) -> LakeSettings:
        settings = cls(
            lateness_s=env_float("IOT_LAKE_LATENESS_S", 1800, minimum=0),
            file_max_rows=env_int("IOT_LAKE_FILE_MAX_ROWS", 2_000_000, minimum=1000),
            lookback_hours=env_int("IOT_LAKE_LOOKBACK_HOURS", 12, minimum=1),
            raw_retention_hours=env_float("IOT_RAW_BATCH_RETENTION_HOURS", 72, minimum=0),
        )
        ledger_days = RetentionSettings.from_env().ledger
        if not _keeps_longer(ledger_days, settings.raw_retention_hours / 24):
            raise SettingsError(
                f"IOT_RAW_BATCH_RETENTION_HOURS={settings.raw_retention_hours:g} outlives the "
                f"load ledger IOT_RETENTION_LEDGER_DAYS={ledger_days:g}: a raw batch must be "
                "deleted before its ledger row"
            )
        return settings
