"""Dagster's PostgreSQL storage, holding its connections open in every Dagster process.

``dagster_postgres`` opens a new database connection for every storage call, except in the
webserver (``optimize_for_webserver``). Each one costs a forked PostgreSQL backend and a
SCRAM authentication. The daemon's loops (run queue every second, sensor ticks every 5 s)
and the code server's sensor evaluations made ~14 connections a second this way, on an
otherwise idle stack as much as under load; at 50,000 rows/s on 2 cores that churn took
CPU the load needed.

This storage is ``DagsterPostgresStorage`` with the webserver's pooling in every process
(one kept connection per storage, more on demand, ``statement_timeout`` off as outside the
webserver). A kept connection may be dead after PostgreSQL restarts: every checkout from a
pool pings it first and replaces it if it fails, so a restart costs a reconnect, not a
failed daemon iteration or run (the retry that ``dagster_postgres`` wraps around
connecting covers the replacement too).

Configured in ``deploy/dagster/dagster.yaml`` as ``storage: custom:`` with the same
settings as ``storage: postgres:``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

# Extra connections a storage may open at once beyond the kept one (threads of the daemon,
# the sensor workers), closed again when returned.
MAX_OVERFLOW = 8
# Kept connections are replaced after an hour, as the webserver does by default.
POOL_RECYCLE_S = 3600


@sqlalchemy.event.listens_for(sqlalchemy.pool.QueuePool, "checkout")
def _ping_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pessimistic disconnect handling: a connection that fails a trivial
    query is discarded and the checkout retried with a new one. On every ``QueuePool`` of
    the process: the pools of this storage and, in the webserver, Dagster's own."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT 1")
    except Exception as exc:  # the driver's error types differ; any failure means "dead"
        raise sqlalchemy.exc.DisconnectionError() from exc
    finally:
        cursor.close()


class PooledPostgresStorage(DagsterPostgresStorage):
    """``DagsterPostgresStorage`` whose run, event log and schedule storages keep a
    connection open (see the module docstring for why)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for storage in (self.run_storage, self.event_log_storage, self.schedule_storage):
            storage.optimize_for_webserver(
                statement_timeout=0, pool_recycle=POOL_RECYCLE_S, max_overflow=MAX_OVERFLOW
            )

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Mapping[str, Any]
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
