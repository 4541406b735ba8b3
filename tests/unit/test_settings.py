"""State and certificate paths do not depend on the folder a command runs from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from iot_platform.settings import PROJECT_ROOT, PlatformSettings, SettingsError

_PATHS = (
    "from iot_platform.settings import PlatformSettings as P; s = P.from_env(); "
    "print(s.home, s.certs_dir, s.local_store_dir)"
)


def test_defaults_resolve_from_the_checkout_not_the_current_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"IOT_HOME", "IOT_CERTS_DIR"}}
    env.pop("IOT_LOCAL_STORE_DIR", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", _PATHS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    home, certs, objects = result.stdout.split()
    assert (home, certs, objects) == (
        str(PROJECT_ROOT / ".iot"),
        str(PROJECT_ROOT / "certs"),
        str(PROJECT_ROOT / ".iot" / "objects"),
    )


@pytest.mark.parametrize("name", ["IOT_HOME", "IOT_CERTS_DIR", "IOT_LOCAL_STORE_DIR"])
def test_a_relative_path_is_refused_by_name(monkeypatch, name):
    monkeypatch.setenv(name, ".iot")
    with pytest.raises(SettingsError, match=f"{name}='.iot' is a relative path"):
        PlatformSettings.from_env()


def test_an_absolute_path_is_taken_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv("IOT_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    assert PlatformSettings.from_env().local_store_dir == tmp_path / "state" / "objects"
