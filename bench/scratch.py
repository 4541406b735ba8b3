"""A scratch PostgreSQL for the benchmarks that need only a warehouse, not the stack.

A temporary directory, a free loopback port and a throwaway password; the server is
stopped and the directory removed on the way out, whatever happened.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iot_platform.services.postgres import PostgresServer
from iot_platform.services.process import free_port


@contextmanager
def scratch_warehouse(
    name: str, *, bindir: Path | None = None, dialect: str | None = None
) -> Iterator[tuple[Path, str]]:
    """(a work directory, the conninfo of an empty database ``bench``) on a new server
    from ``bindir`` (default the system's), which starts ``dialect``'s extension."""
    work = Path(tempfile.mkdtemp(prefix=f"iot-bench-{name}-"))
    work.chmod(0o755)  # PostgreSQL runs as user postgres when we are root
    server = PostgresServer(
        work / "pg",
        port=free_port(),
        password=secrets.token_urlsafe(16),
        bindir=bindir,
        dialect=dialect,
    )
    try:
        server.start()
        server.ensure_database("bench")
        yield work, server.conninfo("bench")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
