"""Atomic file replacement: the one implementation the PKI, the local object store, the
ingest spool and the broker configuration share.

A reader (the broker re-reading its CRL, the sensor listing the store, a restarted daemon
scanning its spool) sees the old file or the new one, never a part: the bytes go to a
temporary file in the same directory (``os.replace`` is atomic only within one file system),
created with its final mode from the start (a private key is never world-readable, even
for a moment), and only then replace the target. ``durable`` also fsyncs the file and its
directory, so the content survives a power loss once this returns: the spool and the object
store acknowledge MQTT messages on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Temporary files end with this; listings skip them and a restart removes leftovers.
PARTIAL_SUFFIX = ".partial"


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; set the final mode before any byte
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a new or replaced file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_partial(path: Path | os.DirEntry[str]) -> bool:
    """A temporary file of an ``atomic_write`` in progress (or interrupted by a crash)."""
    return path.name.endswith(PARTIAL_SUFFIX)


def remove_partials(root: Path) -> int:
    """Delete what interrupted writes left under ``root``; returns how many."""
    leftovers = [p for p in root.rglob(f"*{PARTIAL_SUFFIX}") if p.is_file()]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)
