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


def test_exec_reads_secret_files_into_the_environment_of_the_command(tmp_path):
    """`iot-platform exec`: containers configure only NAME_FILE paths (no secret in
    `docker inspect`); the command gets NAME, and no NAME_FILE, in its environment."""
    import subprocess
    import sys

    secret = tmp_path / "pg_password"
    secret.write_text("s3cr3t\n")
    env = {"PATH": "/usr/bin:/bin", "IOT_PG_PASSWORD_FILE": str(secret)}
    probe = "import os; print(os.environ['IOT_PG_PASSWORD'], 'IOT_PG_PASSWORD_FILE' in os.environ)"
    argv = [sys.executable, "-m", "iot_platform.cli", "exec", "--", sys.executable, "-c", probe]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "s3cr3t False\n"), done.stderr
    env["IOT_PG_PASSWORD_FILE"] = str(tmp_path / "missing")
    failed = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert "IOT_PG_PASSWORD_FILE" in failed.stderr and "s3cr3t" not in failed.stderr
