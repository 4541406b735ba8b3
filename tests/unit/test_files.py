"""Atomic replacement (iot_platform/files.py) and the spool that builds on it."""

from __future__ import annotations

import os
import stat

import pytest

from ingest_daemon.spool import Spool
from iot_platform.files import PARTIAL_SUFFIX, atomic_write, is_partial, remove_partials

KEY = "raw/v1/date=2026-03-01/hour=12/20260301T120000000000Z-test-00000001.parquet"


def test_atomic_write_replaces_with_the_final_mode_and_leaves_no_temporary(tmp_path):
    key = tmp_path / "deep" / "device.key"
    atomic_write(key, b"old", mode=0o600)
    atomic_write(key, b"new", mode=0o600)
    assert key.read_bytes() == b"new"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert [p.name for p in key.parent.iterdir()] == ["device.key"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "crl.pem"
    atomic_write(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert not any(is_partial(p) for p in tmp_path.iterdir())


def test_the_spool_drops_what_a_crash_left_half_written_and_counts_the_rest(tmp_path):
    done = tmp_path / KEY
    done.parent.mkdir(parents=True)
    done.write_bytes(b"x" * 10)
    (done.parent / f".{done.name}.abc{PARTIAL_SUFFIX}").write_bytes(b"half")
    spool = Spool(tmp_path, max_bytes=100)
    assert (spool.count, spool.bytes) == (1, 10)
    assert spool.pending() == [(KEY, done)]
    assert remove_partials(tmp_path) == 0
    assert spool.save(KEY, b"y" * 20)  # a replay of the same key replaces, never adds
    assert (spool.count, spool.bytes) == (1, 20)
    assert not spool.save(KEY.replace("00000001", "00000002"), b"z" * 81)  # over budget
