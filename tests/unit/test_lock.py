"""The lock in requirements/ agrees with pyproject.toml, and every installer uses it.

scripts/bootstrap.sh (so CI) and the Dockerfile install the lock, then the project with
``--no-deps``: a range changed in pyproject.toml without re-locking (scripts/lock.sh)
would go unnoticed until an install; here it fails with the package named.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "requirements" / "runtime.txt"
DEV = ROOT / "requirements" / "dev.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin (name==version)"
        out[canonicalize_name(match[1])] = match[2]
    return out


def requirements(group: str) -> list[Requirement]:
    """The requirements of the dependencies (group "") or of an extra, the project's own
    extras (e.g. dev -> analyst) expanded."""
    specs = PROJECT["dependencies"] if not group else PROJECT["optional-dependencies"][group]
    out: list[Requirement] = []
    for spec in specs:
        req = Requirement(spec)
        if canonicalize_name(req.name) == SELF:
            for extra in sorted(req.extras):
                out += requirements(extra)
        else:
            out.append(req)
    return out


@pytest.mark.parametrize(
    ("lock", "groups"), [(RUNTIME, [""]), (DEV, ["", "dev"])], ids=["runtime", "dev"]
)
def test_the_lock_satisfies_pyproject(lock: Path, groups: list[str]) -> None:
    locked = pins(lock)
    for group in groups:
        for req in requirements(group):
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{req} is not in {lock.name}: run scripts/lock.sh"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"{lock.name} pins {name}=={locked[name]}, outside {req}: run scripts/lock.sh"
            )


def test_dev_lock_keeps_the_runtime_pins() -> None:
    runtime, dev = pins(RUNTIME), pins(DEV)
    differ = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differ, f"runtime vs dev pins differ: {differ}"
    assert SELF not in runtime and SELF not in dev, "the project itself is installed editable"


def test_installers_use_the_lock() -> None:
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "requirements/runtime.txt" in bootstrap and "requirements/dev.txt" in bootstrap
    assert re.search(r"install -q --no-deps -e \.", bootstrap)
    dockerfile = (ROOT / "Dockerfile").read_text()
    lock_layer = re.search(r"^RUN pip install [^\n]*-r requirements/runtime\.txt", dockerfile, re.M)
    source = re.search(r"^COPY \. \.", dockerfile, re.M)
    assert lock_layer and source, "the Dockerfile installs the lock, then copies the source"
    assert lock_layer.start() < source.start(), "the lock layer must come before the source"
    assert re.search(r"pip install [^\n]*--no-deps -e \.", dockerfile)
