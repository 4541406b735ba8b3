"""`iot-ingest` / `python -m ingest_daemon`: run until SIGTERM/SIGINT, then flush and exit."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ingest_daemon.config import IngestSettings
from ingest_daemon.daemon import IngestDaemon
from iot_platform.objectstore import ObjectStoreError, object_store_from_env
from iot_platform.settings import SettingsError


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s",
    )
    try:
        settings = IngestSettings.from_env()
        store = object_store_from_env()
    except (SettingsError, ObjectStoreError) as exc:
        print(f"iot-ingest: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        store.ensure_ready()
    except ObjectStoreError as exc:  # keep going: batches spool until the store returns
        logging.getLogger("ingest_daemon").warning("object store not ready: %s", exc)
    daemon = IngestDaemon(settings, store)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon.start()
    stop.wait()
    return 0 if daemon.stop() else 1


if __name__ == "__main__":
    sys.exit(main())
