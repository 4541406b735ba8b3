"""Object storage for raw batches: one small interface, two backends.

* ``S3Store`` — S3/MinIO through the ``minio`` SDK (compose, production);
* ``LocalDirectoryStore`` — a directory with the same key layout and the same sorted,
  ``start_after`` listing (the embedded default).

The ingest daemon writes through it and the Dagster sensor and assets read through it,
so both backends must behave identically; ``tests/integration/test_objectstore_contract.py``
runs one suite against both.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from iot_platform.files import atomic_write, is_partial
from iot_platform.settings import PlatformSettings, SettingsError, env_secret

# S3 allows more, but raw batch keys only need these; refusing the rest keeps a key from
# escaping the local store's root ("..", absolute paths, backslashes).
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9!_.*'()=+-]+(/[A-Za-z0-9!_.*'()=+-]+)*$")


class ObjectStoreError(Exception):
    """Any object store failure; the message says which store and key."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The store cannot be reached right now (retry later)."""


class ObjectNotFound(ObjectStoreError):
    """The key does not exist."""


class InvalidKey(ObjectStoreError):
    """The key is not a safe relative path."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def validate_key(key: str) -> str:
    if not _KEY_PATTERN.match(key) or any(part in {".", ".."} for part in key.split("/")):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> list[ObjectInfo]:
        """Objects under ``prefix`` in key order, strictly after ``start_after``."""
        ...

    def delete(self, key: str) -> None: ...

    def ensure_ready(self) -> None:
        """Create the bucket/directory if needed; raise ObjectStoreUnavailable if unreachable."""
        ...

    def describe(self) -> str: ...


class LocalDirectoryStore:
    """Objects as files under ``root``; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def ensure_ready(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnavailable(f"{self.describe()}: {exc.strerror}") from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write(self._path(key), data)
        except OSError as exc:
            raise ObjectStoreUnavailable(f"{self.describe()}: put {key}: {exc.strerror}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.describe()}: no object {key!r}") from None
        except OSError as exc:
            raise ObjectStoreUnavailable(f"{self.describe()}: get {key}: {exc.strerror}") from exc

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.describe()}: no object {key!r}") from None
        return self._info(key, st)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        # Not a content hash: a cheap change detector (size + mtime), like a weak etag.
        return ObjectInfo(
            key,
            st.st_size,
            f"{st.st_size:x}-{st.st_mtime_ns:x}",
            datetime.fromtimestamp(st.st_mtime, UTC),
        )

    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for key in self._walk(self.root, "", prefix, start_after or ""):
            try:
                out.append(self._info(key, (self.root / key).stat()))
            except FileNotFoundError:
                continue  # deleted while listing
            if limit is not None and len(out) >= limit:
                break
        return out

    def _walk(self, directory: Path, base: str, prefix: str, start_after: str) -> Iterator[str]:
        """Keys in S3 order (byte-wise), descending only into directories that can match."""
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        names = []
        for entry in entries:
            if is_partial(entry):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            names.append((entry.name + "/" if is_dir else entry.name, is_dir))
        for name, is_dir in sorted(names):
            key = base + name
            # Skip subtrees that cannot contain a key matching the prefix or after start_after.
            if not (key.startswith(prefix) or prefix.startswith(key)):
                continue
            if is_dir:
                if start_after and not start_after.startswith(key) and key < start_after:
                    continue
                yield from self._walk(directory / name[:-1], key, prefix, start_after)
            elif key.startswith(prefix) and key > start_after:
                yield key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """S3 or MinIO through the ``minio`` SDK, with short timeouts and few retries.

    Short timeouts matter: the ingest daemon must notice an outage quickly and spool,
    rather than hang in an upload while the broker waits for acknowledgements.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 10.0,
        retries: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
            maxsize=8,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            http_client=http,
        )

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def _fail(self, action: str, key: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, S3Error) and exc.code in {"NoSuchKey", "NoSuchObject"}:
            return ObjectNotFound(f"{self.describe()}: no object {key!r}")
        if isinstance(exc, S3Error):
            return ObjectStoreError(f"{self.describe()}: {action} {key}: {exc.code} {exc.message}")
        return ObjectStoreUnavailable(f"{self.describe()}: {action} {key}: {exc}")

    def _modified(self, value: datetime | None, action: str, key: str) -> datetime:
        """S3 always sends Last-Modified; the SDK types it optional. An answer without it
        is a broken server, reported as such rather than stored as an ObjectInfo whose
        ``last_modified`` is None despite its type."""
        if value is None:
            raise ObjectStoreError(f"{self.describe()}: {action} {key}: no Last-Modified")
        return value

    def ensure_ready(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("ensure bucket", "", exc) from exc

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        try:
            self.client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type="application/vnd.apache.parquet",
            )
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        validate_key(key)
        response = None
        try:
            response = self.client.get_object(self.bucket, key)
            return response.read()
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("get", key, exc) from exc
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        try:
            obj = self.client.stat_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("stat", key, exc) from exc
        modified = self._modified(obj.last_modified, "stat", key)
        return ObjectInfo(key, obj.size or 0, (obj.etag or "").strip('"'), modified)

    def list(
        self, prefix: str = "", start_after: str | None = None, limit: int | None = None
    ) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        try:
            for obj in self.client.list_objects(
                self.bucket,
                prefix=prefix or None,
                recursive=True,
                start_after=start_after,
            ):
                out.append(
                    ObjectInfo(
                        obj.object_name,
                        obj.size or 0,
                        (obj.etag or "").strip('"'),
                        self._modified(obj.last_modified, "list", obj.object_name),
                    )
                )
                if limit is not None and len(out) >= limit:
                    break
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return out

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail("delete", key, exc) from exc


def object_store_from_env(settings: PlatformSettings | None = None) -> ObjectStore:
    """The store selected by IOT_OBJECT_STORE; S3 credentials from IOT_S3_ACCESS_KEY/SECRET_KEY."""
    settings = settings or PlatformSettings.from_env()
    if settings.object_store == "local":
        return LocalDirectoryStore(settings.local_store_dir)
    access_key = env_secret("IOT_S3_ACCESS_KEY")
    secret_key = env_secret("IOT_S3_SECRET_KEY")
    if access_key is None or secret_key is None:
        raise SettingsError(
            "IOT_OBJECT_STORE=s3 needs IOT_S3_ACCESS_KEY and IOT_S3_SECRET_KEY (or their _FILE)"
        )
    return S3Store(
        settings.s3_endpoint,
        access_key.value,
        secret_key.value,
        settings.s3_bucket,
        secure=settings.s3_secure,
        connect_timeout_s=min(3.0, settings.s3_timeout_s),
        read_timeout_s=settings.s3_timeout_s,
    )
