"""Durable local spool for batches the object store could not take yet.

A spooled file is fsync'd (file and directory) before its messages are acknowledged,
and keeps its object key as its path, so a later upload — even after a restart —
writes the same key (a replay overwrites, never duplicates).
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from pathlib import Path

from iot_platform.files import atomic_write, remove_partials
from iot_platform.rawbatch import KEY_ROOT


class Spool:
    """Files under ``root`` named by object key; bounded by ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        remove_partials(root)  # a crash mid-write: never acknowledged
        self._bytes = sum(p.stat().st_size for p in self._files())
        self._count = sum(1 for _ in self._files())

    def _files(self) -> Iterator[Path]:
        return (p for p in self.root.rglob("*.parquet") if p.is_file())

    def _path(self, key: str) -> Path:
        if not key.startswith(KEY_ROOT) or ".." in key.split("/"):
            raise ValueError(f"refusing to spool unexpected key {key!r}")
        return self.root / key

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def count(self) -> int:
        return self._count

    def has_room_for(self, size: int) -> bool:
        return self._bytes + size <= self.max_bytes

    # builtins.bytes: inside this class, `bytes` names the property above.
    def save(self, key: str, data: builtins.bytes) -> bool:
        """Durably store one batch; False (nothing written) when the budget would be exceeded."""
        with self._lock:
            if not self.has_room_for(len(data)):
                return False
            path = self._path(key)
            replaced = path.stat().st_size if path.exists() else None
            atomic_write(path, data)
            self._bytes += len(data) - (replaced or 0)
            self._count += 0 if replaced is not None else 1
            return True

    def pending(self) -> list[tuple[str, Path]]:
        """(key, path) of every spooled batch, oldest key first."""
        return sorted((str(p.relative_to(self.root)), p) for p in self._files())

    def remove(self, path: Path) -> None:
        with self._lock:
            size = path.stat().st_size
            path.unlink()
            self._bytes -= size
            self._count -= 1
