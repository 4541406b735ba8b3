"""Versioned, idempotent warehouse migrations for both dialects (DESIGN §6).

TimescaleDB is used when ``CREATE EXTENSION timescaledb`` succeeds; otherwise plain
PostgreSQL gets the same tables, columns and names (the aggregates become ordinary tables
that the aggregate assets upsert), so analyst SQL and dbt models run unchanged on both.

Each migration has a common part and a per-dialect part; ``schema_migrations`` records
what ran, so ``migrate`` is cheap to call on every start. Migrations run under an
advisory lock, so concurrent callers (webserver, daemon, runs) do not race.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import psycopg
from psycopg import errors, sql

from iot_platform.settings import Secret, SettingsError, env_secret, warehouse_dialect_setting

log = logging.getLogger(__name__)

_LOCK_ID = 0x10_7_DA7A  # any constant shared by every migrating process


class Dialect(StrEnum):
    TIMESCALE = "timescaledb"
    POSTGRES = "postgresql"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    common: str
    timescale: str = ""
    postgres: str = ""


_AGGREGATE_COLUMNS = """
    bucket timestamptz NOT NULL, device_id text NOT NULL, metric text NOT NULL,
    count bigint NOT NULL, sum double precision NOT NULL, avg double precision NOT NULL,
    min double precision NOT NULL, max double precision NOT NULL,
    first double precision NOT NULL, last double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
"""


def _rollup_of_rollup(name: str, width: str, source: str) -> str:
    """A hierarchical continuous aggregate: sums of sums, min of mins, first of firsts."""
    return f"""
    CREATE MATERIALIZED VIEW {name}
    WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
    SELECT time_bucket(INTERVAL '{width}', bucket) AS bucket, device_id, metric,
           sum(count)::bigint AS count, sum(sum) AS sum, sum(sum) / sum(count) AS avg,
           min(min) AS min, max(max) AS max,
           first(first, bucket) AS first, last(last, bucket) AS last
    FROM {source} GROUP BY 1, 2, 3 WITH NO DATA;"""  # noqa: S608 - DDL from constants


def _rollup_table(name: str) -> str:
    """Plain PostgreSQL: the rollup as a table the refresh asset upserts."""
    return f"""
    CREATE TABLE {name} ({_AGGREGATE_COLUMNS});
    CREATE INDEX {name}_bucket ON {name} (bucket);"""


CORE = Migration(
    1,
    "core tables",
    common="""
    CREATE TABLE devices (
        device_id text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
        device_type text NOT NULL DEFAULT 'generic',
        metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
        send_interval_s double precision NOT NULL DEFAULT 10,
        hello_interval_s double precision NOT NULL DEFAULT 30,
        enrolled_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        last_seen timestamptz
    );
    CREATE TABLE device_certificates (
        serial_hex text PRIMARY KEY,
        device_id text NOT NULL REFERENCES devices (device_id),
        fingerprint_sha256 text NOT NULL,
        not_before timestamptz NOT NULL,
        not_after timestamptz NOT NULL,
        issued_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz,
        reason text
    );
    CREATE INDEX device_certificates_device ON device_certificates (device_id);
    CREATE TABLE certificate_audit (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at timestamptz NOT NULL DEFAULT now(),
        action text NOT NULL,
        serial_hex text,
        device_id text,
        actor text NOT NULL,
        dagster_run_id text,
        detail jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE TABLE device_parameters (
        device_id text NOT NULL,
        mode text NOT NULL,
        connector text NOT NULL,
        component text NOT NULL,
        encoding text NOT NULL
            CHECK (encoding IN ('boolean', 'boolean_map', 'hex_to_float', 'raw_string')),
        metric text NOT NULL,
        unit text,
        scale double precision,
        PRIMARY KEY (device_id, mode, connector, component)
    );
    CREATE TABLE ingest_batches (
        object_key text PRIMARY KEY,
        batch_id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        partition_key text NOT NULL,
        etag text,
        size_bytes bigint,
        raw_rows integer NOT NULL,
        telemetry_rows integer NOT NULL,
        event_rows integer NOT NULL,
        reject_rows integer NOT NULL,
        duplicate_rows integer NOT NULL,
        min_ts timestamptz,
        max_ts timestamptz,
        refresh_from timestamptz,
        refresh_to timestamptz,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        load_count integer NOT NULL DEFAULT 1,
        dagster_run_id text
    );
    CREATE INDEX ingest_batches_partition ON ingest_batches (partition_key);
    CREATE INDEX ingest_batches_run ON ingest_batches (dagster_run_id);
    CREATE TABLE telemetry (
        ts timestamptz NOT NULL,
        -- "C" collation: byte-wise comparisons make the unique index several times
        -- cheaper to maintain than a locale's, and ids need no linguistic order.
        device_id text COLLATE "C" NOT NULL,
        metric text COLLATE "C" NOT NULL,
        value double precision NOT NULL,
        unit text,
        batch_id bigint NOT NULL
    );
    CREATE TABLE device_events (
        ts timestamptz NOT NULL,
        device_id text NOT NULL,
        msg_type text NOT NULL,
        seq bigint,
        body jsonb NOT NULL,
        received_at timestamptz NOT NULL,
        batch_id bigint NOT NULL
    );
    CREATE INDEX device_events_device_ts ON device_events (device_id, ts);
    CREATE INDEX device_events_batch ON device_events (batch_id);
    CREATE TABLE device_messages (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts timestamptz NOT NULL,
        received_at timestamptz NOT NULL,
        msg_type text NOT NULL,
        batch_id bigint NOT NULL
    );
    CREATE INDEX device_messages_device_received ON device_messages (device_id, received_at);
    CREATE INDEX device_messages_batch ON device_messages (batch_id);
    CREATE TABLE decode_rejects (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        batch_key text NOT NULL,
        batch_id bigint NOT NULL,
        received_at timestamptz NOT NULL,
        topic text NOT NULL,
        reason text NOT NULL,
        detail text NOT NULL,
        payload_excerpt text NOT NULL
    );
    CREATE INDEX decode_rejects_batch ON decode_rejects (batch_id);
    CREATE INDEX decode_rejects_received ON decode_rejects (received_at);
    CREATE TABLE device_health (
        checked_at timestamptz NOT NULL,
        device_id text NOT NULL,
        check_name text NOT NULL,
        status text NOT NULL CHECK (status IN ('ok', 'warn', 'error')),
        detail jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE INDEX device_health_device ON device_health (device_id, checked_at);
    """,
    timescale=f"""
    SELECT create_hypertable('telemetry', by_range('ts', INTERVAL '1 day'));
    CREATE UNIQUE INDEX telemetry_device_metric_ts ON telemetry (device_id, metric, ts);
    ALTER TABLE telemetry SET (
        timescaledb.compress,
        timescaledb.compress_segmentby = 'device_id',
        timescaledb.compress_orderby = 'metric, ts DESC'
    );
    SELECT add_compression_policy('telemetry', INTERVAL '7 days');
    CREATE MATERIALIZED VIEW telemetry_1m
    WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
    SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket, device_id, metric,
           count(*) AS count, sum(value) AS sum, avg(value) AS avg,
           min(value) AS min, max(value) AS max,
           first(value, ts) AS first, last(value, ts) AS last
    FROM telemetry GROUP BY 1, 2, 3 WITH NO DATA;
    {_rollup_of_rollup("telemetry_1h", "1 hour", "telemetry_1m")}
    {_rollup_of_rollup("telemetry_1d", "1 day", "telemetry_1h")}
    """,  # noqa: S608 - DDL from constants
    postgres=f"""
    CREATE UNIQUE INDEX telemetry_device_metric_ts ON telemetry (device_id, metric, ts);
    -- Cheap to maintain on append-mostly data: BRIN for time ranges, and batch_id grows
    -- monotonically, so its B-tree only ever appends (used when a batch is reloaded).
    CREATE INDEX telemetry_ts_brin ON telemetry USING brin (ts);
    CREATE INDEX telemetry_batch ON telemetry (batch_id);
    {"".join(_rollup_table(name) for name in ("telemetry_1m", "telemetry_1h", "telemetry_1d"))}
    """,
)

TIME_BUCKET = Migration(
    2,
    "time_bucket on plain PostgreSQL",
    common="",
    # Analyst SQL and dbt models use time_bucket(); on plain PostgreSQL it is date_bin with
    # TimescaleDB's default origin, so the same queries give the same buckets on both.
    postgres="""
    CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$;
    """,
)

DEVICE_ID_CASE = Migration(
    3,
    "device ids unique ignoring case",
    # ``ACC-METER-01`` next to ``acc-meter-01`` is a look-alike device with certificates of
    # its own: the registry refuses it (the enrollment names the enrolled spelling). Fails
    # on a registry that already holds such a pair: resolve those by hand first.
    common="""
    CREATE UNIQUE INDEX devices_device_id_lower ON devices (lower(device_id));
    """,
)

MESSAGE_SEQ_INDEX = Migration(
    4,
    "device_messages by (device_id, seq)",
    # The loader looks up each telemetry envelope's (device_id, seq) among the messages
    # already stored, so that de-duplication does not depend on how messages were batched.
    common="""
    CREATE INDEX device_messages_device_seq ON device_messages (device_id, seq);
    """,
)

HEALTH_HISTORY_AGE = Migration(
    5,
    "device_health by checked_at (retention)",
    # Each health evaluation deletes a bounded batch of rows older than the retention
    # (IOT_HEALTH_RETENTION_DAYS); BRIN finds them without scanning the whole history and
    # costs almost nothing to maintain on this append-only table.
    common="""
    CREATE INDEX device_health_checked_at ON device_health USING brin (checked_at);
    """,
)

STATUS_BY_RECEIVE_TIME = Migration(
    6,
    "device status events by receive time",
    # Presence is the status received last (a last will carries the connect time): the
    # silent_devices rule looks up each device's newest status by received_at.
    common="""
    CREATE INDEX device_events_status_received ON device_events (device_id, received_at)
        WHERE msg_type = 'status';
    """,
)

RETENTION_INDEXES = Migration(
    7,
    "indexes for retention passes",
    # The retention pass deletes bounded batches of the oldest rows (iot_platform/warehouse/
    # retention.py); BRIN on the append-ordered time column finds them without scanning the
    # table, and costs almost nothing to maintain.
    common="""
    CREATE INDEX device_events_ts_brin ON device_events USING brin (ts);
    CREATE INDEX device_messages_received_brin ON device_messages USING brin (received_at);
    CREATE INDEX ingest_batches_loaded_at_brin ON ingest_batches USING brin (loaded_at);
    """,
)

GRAFANA_ROLE = "iot_grafana"
GRAFANA_READER = Migration(
    8,
    "read-only role for Grafana",
    # Dashboards read the warehouse as iot_grafana: SELECT on every table and view of the
    # warehouse schema (also those later migrations create), read-only transactions and a
    # statement timeout, so a heavy panel cannot hold locks or run for ever. The role is
    # created NOLOGIN; grant_grafana_login gives it a password from a secret setting.
    common=f"""
    DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{GRAFANA_ROLE}') THEN CREATE ROLE {GRAFANA_ROLE} NOLOGIN; END IF; END $$;
    ALTER ROLE {GRAFANA_ROLE} SET default_transaction_read_only = on;
    ALTER ROLE {GRAFANA_ROLE} SET statement_timeout = '30s';
    DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {GRAFANA_ROLE}', current_schema()); END $$;
    DO $$ BEGIN EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO {GRAFANA_ROLE}', current_schema()); END $$;
    DO $$ BEGIN EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO {GRAFANA_ROLE}', current_schema()); END $$;
    """,  # noqa: E501 - one line per DO block: _statements splits at ';' line ends
)

ROLLUPS_REFRESHED = Migration(
    9,
    "ingest_batches.rollups_refreshed_at",
    # A following load run refreshes the rollups beside its load, every minute, for the
    # batches it loaded since (warehouse/aggregates.py refresh_loaded); the mark tells the
    # rollup steps at the end of the run which batches are left. A reload clears it.
    common="""
    ALTER TABLE ingest_batches ADD COLUMN rollups_refreshed_at timestamptz;
    """,
)

TELEMETRY_BATCH_BRIN = Migration(
    10,
    "telemetry batch_id index as BRIN",
    # The B-tree on telemetry.batch_id (only used to delete a batch's rows when it is
    # reloaded) was a quarter of the cost of every COPY into telemetry: 280,000 rows/s with
    # it, 370,000 without. batch_id grows with insertion order, so a BRIN finds a batch's
    # rows as well and costs almost nothing to maintain; autosummarize keeps the ranges a
    # reload searches summarised. TimescaleDB never had this index (chunks are deleted whole).
    common="",
    postgres="""
    DROP INDEX telemetry_batch;
    CREATE INDEX telemetry_batch_brin ON telemetry USING brin (batch_id) WITH (autosummarize = on);
    """,
)

UNREFRESHED_BATCHES = Migration(
    11,
    "ingest_batches whose rollups are not refreshed, by refresh_to",
    # The health rule values_out_of_range reads telemetry_1m for what it reflects and raw
    # telemetry for the batches not marked refreshed whose ranges reach into its window
    # (health.py). Without an index that look-up scans the whole ledger, every evaluation:
    # 0.7-1.1 s for 30 days at one batch a second (2.6 million rows), against 1-9 ms with
    # this one, which holds only the unmarked batches.
    common="""
    CREATE INDEX ingest_batches_unrefreshed ON ingest_batches (refresh_to)
        WHERE rollups_refreshed_at IS NULL;
    """,
)

MESSAGES_BATCH_BRIN = Migration(
    12,
    "device_messages batch_id index as BRIN",
    # Since the loader's (device_id, seq) claim lookup stopped reading a batch's own rows
    # back by batch_id, the B-tree on device_messages.batch_id only serves deleting a
    # reloaded batch's rows, and each B-tree costs every message of every COPY (about 1 us
    # for this one, 3 us for each text-keyed one). batch_id grows with insertion order, so
    # a BRIN finds a batch's rows as well, like telemetry's (migration 10).
    common="""
    DROP INDEX device_messages_batch;
    CREATE INDEX device_messages_batch_brin ON device_messages USING brin (batch_id)
        WITH (autosummarize = on);
    """,
)

# device_messages_1m's definition: one row per device and receive minute of the
# device_messages rows received in [{lo}, {hi}). The health rules read the same SELECT over
# the part of their window the table does not reflect yet (warehouse/message_minutes.py).
MINUTES_OF_MESSAGES = """
    SELECT time_bucket(INTERVAL '1 minute', received_at) AS minute, device_id,
           count(*) AS messages, count(DISTINCT seq) AS distinct_seq,
           min(seq) AS min_seq, max(seq) AS max_seq,
           max(abs(extract(epoch FROM received_at - ts))) AS max_skew_s
    FROM device_messages WHERE received_at >= {lo} AND received_at < {hi}
    GROUP BY 1, 2"""

MESSAGE_MINUTES = Migration(
    13,
    "device_messages_1m: per device and receive minute, what the health rules count",
    # sequence_gaps_duplicates and clock_skew read every device_messages row of their
    # window at every evaluation: 21 s and 3 s per evaluation over 36 million rows (60
    # minutes at 10,000 msgs/s). This summary is refreshed with the rollups, once per
    # minute of messages, and the rules read it. received_from/_to are each batch's
    # receive-time range: the minutes its refresh recomputes. Filled here from what is
    # stored, so the rules count the same on an upgraded warehouse.
    common=f"""
    ALTER TABLE ingest_batches ADD COLUMN received_from timestamptz,
                               ADD COLUMN received_to timestamptz;
    CREATE TABLE device_messages_1m (
        minute timestamptz NOT NULL,
        device_id text NOT NULL,
        messages bigint NOT NULL,
        distinct_seq bigint NOT NULL,
        min_seq bigint NOT NULL,
        max_seq bigint NOT NULL,
        max_skew_s numeric NOT NULL,
        PRIMARY KEY (minute, device_id)
    );
    INSERT INTO device_messages_1m {MINUTES_OF_MESSAGES.format(lo="'-infinity'", hi="'infinity'")};
    """,
)

MESSAGES_COVERING_INDEX = Migration(
    14,
    "device_messages (device_id, received_at) index covering seq and ts",
    # The health rules recount a device from its raw messages of the window when its minutes
    # cannot be summed (seqs that overlap: a restart, a redelivery) or show a clock skew.
    # Its rows are interleaved with every other device's, so through the plain index the
    # recount read nearly every heap page of the window: 2.5 s for one device over 30
    # minutes at 10,000 msgs/s, 7.9 s for the skewed device over 60. Covering seq and ts,
    # the recounts (and decode_reject_rate's count) are index-only scans of the device's
    # own entries: 0.16-0.24 s over the same 30 minutes. Cost: 0.7 us more per message
    # stored (+4 %, measured), an index 45 % larger.
    #
    # An index-only scan skips the heap only for pages the visibility map marks all-visible,
    # which is autovacuum's work; with the default insert trigger (20 % of the table) an
    # insert-only table this size would be vacuumed every few days, so the window's pages
    # would never be. A fixed trigger of 1 million inserted rows (100 s at 10,000 msgs/s)
    # keeps all but the last minute or two all-visible.
    common="""
    CREATE INDEX device_messages_device_received_covering
        ON device_messages (device_id, received_at) INCLUDE (seq, ts);
    DROP INDEX device_messages_device_received;
    ALTER TABLE device_messages SET (autovacuum_vacuum_insert_threshold = 1000000,
                                     autovacuum_vacuum_insert_scale_factor = 0);
    """,
)

MIGRATIONS: tuple[Migration, ...] = (
    CORE,
    TIME_BUCKET,
    DEVICE_ID_CASE,
    MESSAGE_SEQ_INDEX,
    HEALTH_HISTORY_AGE,
    STATUS_BY_RECEIVE_TIME,
    RETENTION_INDEXES,
    GRAFANA_READER,
    ROLLUPS_REFRESHED,
    TELEMETRY_BATCH_BRIN,
    UNREFRESHED_BATCHES,
    MESSAGES_BATCH_BRIN,
    MESSAGE_MINUTES,
    MESSAGES_COVERING_INDEX,
)


class DialectError(SettingsError):
    """The requested dialect (IOT_WAREHOUSE_DIALECT) cannot be used here; the message says
    why and what to do. A settings error, so every entry point reports it as one."""


def detect_dialect(conn: psycopg.Connection, requested: str) -> Dialect:
    """The warehouse's dialect: the one it was created with, else — for ``requested``
    ``auto`` — TimescaleDB if ``CREATE EXTENSION timescaledb`` succeeds, else plain
    PostgreSQL.

    Whatever the server says no with (not installed, not preloaded, no privilege, a library
    that does not load) means plain PostgreSQL under ``auto`` and a DialectError naming the
    reason under ``timescaledb``. A warehouse keeps the dialect it was created with: asking
    for the other one is a DialectError, not a silent switch of table types.
    """
    row = conn.execute("SELECT value FROM warehouse_meta WHERE key = 'dialect'").fetchone()
    if row:
        recorded = Dialect(row[0])
        if requested not in ("auto", recorded.value):
            raise DialectError(
                f"IOT_WAREHOUSE_DIALECT={requested} but this warehouse was created as "
                f"{recorded.value}; its tables cannot change dialect in place (use a new "
                "database, or unset IOT_WAREHOUSE_DIALECT)"
            )
        return recorded
    dialect = Dialect.POSTGRES
    if requested != Dialect.POSTGRES.value:
        try:
            _create_timescaledb(conn)
            dialect = Dialect.TIMESCALE
        except psycopg.Error as exc:
            if conn.broken:
                raise
            reason = exc.diag.message_primary or str(exc)
            if requested == Dialect.TIMESCALE.value:
                raise DialectError(
                    f"IOT_WAREHOUSE_DIALECT=timescaledb but the server cannot create the "
                    f"extension: {reason}"
                ) from exc
            # Not installed is the ordinary plain-PostgreSQL case; anything else (installed
            # but not preloaded, no privilege, ...) is worth an operator's attention.
            level = logging.INFO if isinstance(exc, errors.FeatureNotSupported) else logging.WARNING
            log.log(level, "TimescaleDB not available (%s); using plain PostgreSQL", reason)
    conn.execute("INSERT INTO warehouse_meta (key, value) VALUES ('dialect', %s)", [dialect.value])
    return dialect


def _create_timescaledb(conn: psycopg.Connection) -> None:
    """``CREATE EXTENSION timescaledb`` unless it exists, on a short connection of its own
    (same server and credentials): a server that has the extension installed but not
    preloaded answers with FATAL, which ends the session — ``conn``, holding the
    migration's lock, must survive that."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return
    with psycopg.connect(conn.info.dsn, password=conn.info.password, autocommit=True) as own:
        own.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


def migrate(conn: psycopg.Connection, requested: str | None = None) -> tuple[Dialect, list[str]]:
    """Bring the schema up to date; returns the dialect and the migrations applied now.

    ``requested`` is an IOT_WAREHOUSE_DIALECT value (default: the setting). A migration
    with nothing to do in this dialect is recorded but not reported as applied.
    """
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
        conn.execute(
            "CREATE TABLE IF NOT EXISTS warehouse_meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, dialect text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        dialect = detect_dialect(conn, requested or warehouse_dialect_setting())
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            specific = migration.timescale if dialect is Dialect.TIMESCALE else migration.postgres
            statements = _statements(migration.common + specific)
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, dialect) VALUES (%s, %s, %s)",
                [migration.version, migration.name, dialect.value],
            )
            if statements:
                applied_now.append(f"{migration.version:03d} {migration.name}")
                log.info("warehouse migration %03d (%s) applied", migration.version, migration.name)
        grant_grafana_login(conn, env_secret("IOT_GRAFANA_DB_PASSWORD"))
    return dialect, applied_now


def grant_grafana_login(conn: psycopg.Connection, password: Secret | None) -> bool:
    """Let Grafana's read-only role log in with ``password``; None leaves it as it is
    (NOLOGIN until a password is given). ``migrate`` passes ``IOT_GRAFANA_DB_PASSWORD`` (or
    ``_FILE``) on every run, so a changed secret takes effect at the next start;
    ``iot-platform dashboards import`` passes the embedded stack's generated one. libpq
    turns the password into a SCRAM verifier here: the server (and its statement log)
    never sees the password itself."""
    if password is None:
        return False
    verifier = conn.pgconn.encrypt_password(
        password.value.encode(), GRAFANA_ROLE.encode(), b"scram-sha-256"
    )
    conn.execute(
        sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
            sql.Identifier(GRAFANA_ROLE), sql.Literal(verifier.decode())
        )
    )
    return True


def current_dialect(conn: psycopg.Connection) -> Dialect:
    row = conn.execute("SELECT value FROM warehouse_meta WHERE key = 'dialect'").fetchone()
    if row is None:
        raise RuntimeError("the warehouse is not migrated: run `iot-platform db migrate`")
    return Dialect(row[0])


def _statements(sql: str) -> list[str]:
    """Split on ';' at line ends (our migrations have no ';' inside statements)."""
    return [part.strip() for part in sql.split(";\n") if part.strip().rstrip(";").strip()]
