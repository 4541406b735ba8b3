"""One contract, two backends: the local directory must list and read exactly like S3."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator

import pytest

from iot_platform.objectstore import (
    InvalidKey,
    LocalDirectoryStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    S3Store,
)

pytestmark = pytest.mark.integration

KEYS = [
    "raw/v1/date=2026-11-21/hour=23/20261121T235959999999Z-a-00000009.parquet",
    "raw/v1/date=2026-11-22/hour=00/20261122T000000000000Z-a-00000010.parquet",
    "raw/v1/date=2026-11-22/hour=00/20261122T000001000000Z-b-00000001.parquet",
    "raw/v1/date=2026-11-22/hour=01/20261122T010000000000Z-a-00000011.parquet",
    "raw/v1/date=2026-11-22/hour=10/20261122T100000000000Z-a-00000012.parquet",
    "raw/v1-other/x.parquet",
    "raw/v10/y.parquet",
    "zz/last.bin",
]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server) -> Iterator[ObjectStore]:
    if request.param == "local":
        backend: ObjectStore = LocalDirectoryStore(tmp_path / "objects")
    else:
        backend = S3Store(
            s3_server.endpoint,
            s3_server.access_key,
            s3_server.secret_key,
            f"contract-{secrets.token_hex(4)}",
        )
    backend.ensure_ready()
    backend.ensure_ready()  # idempotent
    yield backend


@pytest.fixture
def filled(store: ObjectStore) -> ObjectStore:
    for n, key in enumerate(reversed(KEYS)):
        store.put(key, f"payload {n}".encode())
    return store


def test_put_get_stat_round_trip_and_overwrite(store):
    key = KEYS[0]
    store.put(key, b"\x00first")
    assert store.get(key) == b"\x00first"
    store.put(key, b"second!")  # a replayed batch overwrites: still one object
    assert store.get(key) == b"second!"
    info = store.stat(key)
    assert (info.key, info.size) == (key, 7)
    assert info.etag
    assert [i.key for i in store.list("raw/")] == [key]


def test_list_is_sorted_recursive_and_prefix_exact(filled):
    assert [i.key for i in filled.list()] == sorted(KEYS)
    assert [i.key for i in filled.list("raw/v1/")] == sorted(KEYS[:5])
    assert [i.key for i in filled.list("raw/v1")] == sorted(KEYS[:7])
    assert [i.key for i in filled.list("raw/v1/date=2026-11-22/hour=0")] == sorted(KEYS[1:4])
    assert filled.list("nothing/here/") == []


def test_start_after_and_limit_page_like_s3(filled):
    everything = sorted(KEYS[:5])
    assert [i.key for i in filled.list("raw/v1/", start_after=everything[1])] == everything[2:]
    # start_after need not exist, and may fall between directories.
    between = "raw/v1/date=2026-11-22/hour=00/20261122T000000500000Z"
    assert [i.key for i in filled.list("raw/v1/", start_after=between)] == everything[2:]
    assert [i.key for i in filled.list("raw/v1/", start_after="raw/v1/date=2026-11-22/")] == (
        everything[1:]
    )
    assert [i.key for i in filled.list("raw/v1/", limit=2)] == everything[:2]
    pages, cursor = [], None
    while page := filled.list("raw/v1/", start_after=cursor, limit=2):
        pages.append([i.key for i in page])
        cursor = page[-1].key
    assert [key for page in pages for key in page] == everything
    assert filled.list("raw/v1/", start_after=everything[-1]) == []


def test_missing_objects_and_delete(filled):
    with pytest.raises(ObjectNotFound):
        filled.get("raw/v1/missing.parquet")
    with pytest.raises(ObjectNotFound):
        filled.stat("raw/v1/missing.parquet")
    filled.delete(KEYS[0])
    filled.delete(KEYS[0])  # deleting twice is fine
    assert KEYS[0] not in [i.key for i in filled.list()]


@pytest.mark.parametrize(
    "key", ["../escape", "/abs/path", "a//b", "a/./b", "a/../b", "", "back\\slash", "sp ace"]
)
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(InvalidKey):
        store.put(key, b"x")


def test_s3_outage_is_reported_as_unavailable_quickly(s3_server_factory):
    server = s3_server_factory()
    store = S3Store(
        server.endpoint,
        server.access_key,
        server.secret_key,
        server.bucket,
        connect_timeout_s=1,
        read_timeout_s=2,
        retries=0,
    )
    store.put("raw/a", b"1")
    server.process.signal(signal.SIGSTOP)
    try:
        with pytest.raises(ObjectStoreUnavailable, match="put raw/b"):
            store.put("raw/b", b"2")
    finally:
        server.process.signal(signal.SIGCONT)
    store.put("raw/b", b"2")
    assert [i.key for i in store.list("raw/")] == ["raw/a", "raw/b"]
