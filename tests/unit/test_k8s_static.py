"""deploy/k8s checked statically: no cluster, Helm or kustomize binary on the development
machines, so the manifests are checked the way tests/unit/test_compose_static.py checks
docker-compose.yml.

What is checked, and why it can fail:

* every manifest of the kustomize base, and every pod the Dagster chart makes from
  ``dagster-values.yaml`` (webserver, daemon, each user-code deployment, a run pod), is
  valid against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships, in
  strict mode (an unknown or misspelt field fails), for the oldest and newest Kubernetes
  versions named below;
* the kustomization lists every manifest and uses no transformer this test does not
  model, so what is validated here is what kustomize renders;
* every image is pinned to an exact version or a digest; ours is the project's version,
  Dagster's is the dagster version pyproject.toml pins;
* no secret is inline: no Secret object, no secret-looking key in a ConfigMap, no literal
  value for a secret-looking variable; the Secrets the pods use are exactly those
  docs/kubernetes.md tells the operator to create, with the same keys;
* the variables the code reads without a safe default on Kubernetes are provided, and the
  settings classes (``IngestSettings``, ``PlatformSettings``, ``HealthSettings``) accept
  the environment each pod gets (with its Secret and ConfigMap files in place);
* the ingest StatefulSet keeps its spool on a per-replica volume larger than its spool
  budget, gives SIGTERM time to flush, is ready only when /healthz says so, and its PDB
  selects its pods; the Dagster values agree with dagster.yaml (run queue), workspace.yaml
  (location names and modules) and the settings (storage host, TLS).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ingest_daemon.config import IngestSettings
from iot_platform.health import HealthSettings
from iot_platform.rawbatch import validate_instance
from iot_platform.settings import PlatformSettings
from tests.unit.test_compose_static import SECRET_NAME, CodeEnv, is_pinned, scan_code

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
AUTH = K8S / "auth"
KUSTOMIZATIONS = (BASE, AUTH)
VALUES = K8S / "dagster-values.yaml"
INGRESS_VALUES = K8S / "dagster-values-ingress.yaml"
DOCS = ROOT / "docs" / "kubernetes.md"
# The oldest Kubernetes minor the manifests are meant for, and the newest the package ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Read by libraries, not by our code (so the code scan cannot find them), and why they are set.
LIBRARY_VARIABLES = {
    "PGSSLMODE": "libpq (psycopg, dbt-postgres): TLS to the warehouse",
    "PGSSLROOTCERT": "libpq: the CA that signed the warehouse's certificate",
    "SSL_CERT_FILE": "OpenSSL's default trust (urllib3 under the object store)",
}
USER_CODE_PORT = 3030
# Images that are neither ours nor Dagster's, and what they are for.
THIRD_PARTY_IMAGES = {
    "docker.io/library/postgres": "the chart's init container waiting for PostgreSQL",
    "docker.io/library/busybox": "the chart's init container waiting for the code servers",
    "quay.io/oauth2-proxy/oauth2-proxy": "authentication in front of the UI's ingress",
}


# ---- loading ---------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    """Every object of every kustomization (base, auth)."""
    return [
        doc
        for directory in KUSTOMIZATIONS
        for name in kustomization(directory)["resources"]
        for doc in load_all(directory / name)
    ]


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def ingress_values() -> dict[str, Any]:
    return yaml.safe_load(INGRESS_VALUES.read_text())


@pytest.fixture(scope="module")
def code() -> CodeEnv:
    return scan_code()


@pytest.fixture(scope="module")
def settings_map(objects: list[dict[str, Any]]) -> dict[str, str]:
    return the(objects, "ConfigMap", "iot-platform-settings")["data"]


@pytest.fixture(scope="module")
def ingest(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return the(objects, "StatefulSet", "iot-ingest")


def deployments(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in values["dagster-user-deployments"]["deployments"]}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirement_name: str) -> str:
    """The exact version pyproject.toml pins ``requirement_name`` to."""
    for requirement in pyproject()["project"]["dependencies"]:
        name, sep, version = requirement.partition("==")
        if name == requirement_name and sep:
            return version
    raise AssertionError(f"pyproject.toml does not pin {requirement_name} exactly")


# ---- what the chart makes of the values ---------------------------------------------------


def chart_pod(component: Mapping[str, Any], *, args: list[str] | None = None) -> dict[str, Any]:
    """The pod the chart renders for a webserver, daemon or user-code deployment: its
    Kubernetes-typed values placed where the chart's templates place them."""
    image = component["image"]
    container: dict[str, Any] = {
        "name": "main",
        "image": f"{image['repository']}:{image['tag']}",
        "imagePullPolicy": image.get("pullPolicy", "IfNotPresent"),
        "envFrom": [
            {"configMapRef": {"name": c["name"]}} for c in component.get("envConfigMaps", [])
        ]
        + [{"secretRef": {"name": s["name"]}} for s in component.get("envSecrets", [])],
    }
    if args is not None:
        container["args"] = args
    for key in ("volumeMounts", "resources", "securityContext"):
        if key in component:
            container[key] = component[key]
    spec: dict[str, Any] = {"containers": [container]}
    if "volumes" in component:
        spec["volumes"] = component["volumes"]
    if "podSecurityContext" in component:
        spec["securityContext"] = component["podSecurityContext"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chart"}, "spec": spec}


def run_pod(values: Mapping[str, Any], location: Mapping[str, Any]) -> dict[str, Any]:
    """A run pod of ``location``: the run launcher's runK8sConfig, with the code server's
    config (includeConfigInLaunchedRuns) on top, as dagster_k8s' K8sContainerContext
    merges them (the code location's container context wins)."""
    pod = chart_pod(location, args=["dagster", "api", "execute_run"])
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"].get("runK8sConfig", {})
    container = pod["spec"]["containers"][0]
    pod["spec"]["containers"][0] = {**run_config.get("containerConfig", {}), **container}
    pod["spec"] = {**run_config.get("podSpecConfig", {}), **pod["spec"]}
    return pod


def chart_pods(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    pods = {
        "webserver": chart_pod(values["dagsterWebserver"]),
        "daemon": chart_pod(values["dagsterDaemon"]),
    }
    for name, location in deployments(values).items():
        pods[name] = chart_pod(
            location, args=["dagster", "api", "grpc", *location["dagsterApiGrpcArgs"]]
        )
        pods[f"{name} run"] = run_pod(values, location)
    return pods


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if obj["kind"] != "Pod" else obj["spec"]


def images(node: Any) -> Iterator[str]:
    """Every image a manifest (``image: name:tag``) or the values (``image: {repository,
    tag}``) names."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            elif key == "image" and isinstance(value, Mapping):
                yield f"{value['repository']}:{value.get('tag') or ''}"
            else:
                yield from images(value)
    elif isinstance(node, list):
        for value in node:
            yield from images(value)


# ---- schema validation -------------------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_kustomization_lists_every_manifest_and_nothing_it_would_transform(directory):
    spec = kustomization(directory)
    assert set(spec) <= {"apiVersion", "kind", "namespace", "labels", "resources"}, (
        "a transformer this test does not model: the validated files would not be what "
        "kustomize renders"
    )
    listed = set(spec["resources"])
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"listed, missing: {listed - on_disk}; unlisted: {on_disk - listed}"
    for label in spec.get("labels", []):
        assert not label.get("includeSelectors"), "selectors must not change under an upgrade"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes(objects, version):
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc.message} "
                f"at {'.'.join(map(str, exc.path))}"
            ) from None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pods_the_chart_makes_are_valid_kubernetes(values, version):
    for name, pod in chart_pods(values).items():
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"dagster-values.yaml, {name} pod (Kubernetes {version}): {exc.message} at "
                f"{'.'.join(map(str, exc.path))}"
            ) from None


def test_the_schema_check_fails_on_a_misspelt_field(ingest):
    """Guards the check itself: strict mode must reject a field Kubernetes does not know."""
    broken = yaml.safe_load(yaml.safe_dump(ingest))
    pod_spec(broken)["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# ---- images ------------------------------------------------------------------------------


def test_images_are_pinned_ours_to_the_project_version_dagsters_to_its_pin(
    objects, values, ingress_values
):
    ours = f"iot-platform:{pyproject()['project']['version']}"
    dagster = pinned("dagster")
    found = [*images(objects), *images(values), *images(ingress_values)]
    assert len(found) >= 6
    for image in found:
        repository, _, tag = image.rpartition(":")
        # PostgreSQL numbers its releases MAJOR.MINOR (16.6 is one release).
        postgres_release = repository.endswith("/postgres") and re.fullmatch(r"\d+\.\d+", tag)
        assert is_pinned(image) or postgres_release, f"{image} is not pinned to a release"
        if repository.endswith("iot-platform"):
            assert image.endswith(ours), f"{image}: the project's image is {ours}"
        elif repository.startswith("docker.io/dagster/"):
            assert tag == dagster, f"{image}: Dagster's images must match dagster=={dagster}"
        else:
            assert repository in THIRD_PARTY_IMAGES, f"{image}: whose image, and what for?"


def test_the_image_can_run_the_k8s_run_launcher():
    """Every run pod runs our image and loads the instance, whose run launcher is
    dagster_k8s.K8sRunLauncher: the image's lock must install dagster-k8s, in the
    Dagster family's version."""
    lock = (ROOT / "requirements" / "runtime.txt").read_text()
    assert re.search(rf"^dagster-k8s=={re.escape(pinned('dagster-k8s'))}$", lock, re.MULTILINE)
    assert pinned("dagster-k8s") == pinned("dagster-postgres"), "one Dagster family"


# ---- secrets -------------------------------------------------------------------------------


def documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret` commands in docs/kubernetes.md."""
    secrets: dict[str, set[str]] = {}
    text = DOCS.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.match(r"\s*kubectl -n iot create secret (?:generic|tls) (\S+)(.*)", line)
        if not match:
            continue
        keys = set(re.findall(r"--from-(?:file|literal)=([^=\s]+)=", match.group(2)))
        if " tls " in line:
            keys |= {"tls.crt", "tls.key"}
        secrets[match.group(1)] = keys
    return secrets


def secret_references(node: Any) -> Iterator[tuple[str, str | None]]:
    """(secret name, key or None for all keys) for every Secret a manifest or value uses."""
    if isinstance(node, Mapping):
        if "secretName" in node and "items" in node:
            for item in node["items"]:
                yield node["secretName"], item["key"]
        elif "secretName" in node:
            yield node["secretName"], None
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        if "secretRef" in node:
            yield node["secretRef"]["name"], None
        for value in node.values():
            yield from secret_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_references(value)


def name_value_pairs(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        if "name" in node and "value" in node:
            yield node
        for value in node.values():
            yield from name_value_pairs(value)
    elif isinstance(node, list):
        for value in node:
            yield from name_value_pairs(value)


def test_no_secret_is_inline(objects, values):
    assert not [o for o in objects if o["kind"] == "Secret"], "a Secret object in git"
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            leaked = [k for k in obj.get("data", {}) if SECRET_NAME.search(k)]
            assert not leaked, f"ConfigMap {obj['metadata']['name']} holds {leaked}"
    for env in name_value_pairs([objects, values]):  # env entries, wherever they are
        if SECRET_NAME.search(env["name"]) and not env["name"].endswith("_FILE"):
            raise AssertionError(f"{env['name']} has a literal value: use a Secret")
    for component in ("dagsterWebserver", "dagsterDaemon", *deployments(values)):
        section = deployments(values).get(component) or values[component]
        assert not isinstance(section.get("env"), Mapping), (
            f"{component}: the chart renders an env mapping into a ConfigMap (plain text): "
            "use envConfigMaps / envSecrets"
        )
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"], "the chart would make a Secret of it"
    text = "".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "change-me" not in text and "BEGIN " not in text


def test_the_secrets_used_are_the_ones_the_docs_create(objects, values, ingress_values):
    documented = documented_secrets()
    assert documented, "docs/kubernetes.md creates no Secret (`kubectl -n iot create secret`)"
    used: dict[str, set[str]] = {}
    for name, key in secret_references([objects, chart_pods(values), ingress_values]):
        used.setdefault(name, set())
        if key:
            used[name].add(key)
    used.setdefault(values["global"]["postgresqlSecretName"], set()).add("postgresql-password")
    assert set(used) == set(documented), (
        f"used, not documented: {set(used) - set(documented)}; "
        f"documented, unused: {set(documented) - set(used)}"
    )
    for name, keys in used.items():
        assert keys <= documented[name], f"{name}: the pods read {keys - documented[name]}"
    # envFrom a Secret: each key becomes a variable, so each key must be a name the code reads.
    code = scan_code()
    for pod in chart_pods(values).values():
        for source in pod["spec"]["containers"][0]["envFrom"]:
            if "secretRef" in source:
                unknown = documented[source["secretRef"]["name"]] - code.names
                assert not unknown, f"{source['secretRef']['name']}: {unknown} read by no code"


def test_secret_files_are_readable_by_the_pod_user(objects):
    for obj in objects:
        if "template" not in obj.get("spec", {}):
            continue
        spec = pod_spec(obj)
        user = spec.get("securityContext", {}).get("runAsUser")
        group = spec.get("securityContext", {}).get("fsGroup")
        assert user and user != 0, f"{obj['metadata']['name']} must run as a numeric non-root user"
        for volume in spec.get("volumes", []):
            mode = volume.get("secret", {}).get("defaultMode")
            if mode is not None:  # files are root-owned, group fsGroup: the group must read
                assert group is not None and mode & 0o040, f"{volume['name']}: mode {oct(mode)}"
                assert not mode & 0o007, f"{volume['name']}: world-readable secret files"


# ---- the environment each pod gets ------------------------------------------------------------


def container_env(
    container: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, str]], pod_name: str
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = pod_name
        else:
            raise AssertionError(f"{item['name']}: a value source this test does not model")
    return env


def outside_dagster(code: CodeEnv, name: str, env: Mapping[str, str]) -> bool:
    """Whether a process outside Dagster gets ``name``: a secret read with
    settings.env_secret may come as NAME_FILE even where a Dagster resource reads the same
    name with dg.EnvVar (which is why CodeEnv.accepts refuses NAME_FILE for those)."""
    return bool(env.get(name) or (name in code.secrets and env.get(f"{name}_FILE")))


def mounted_files(
    spec: Mapping[str, Any], container: Mapping[str, Any]
) -> dict[PurePosixPath, str]:
    """Container path -> what is there ("secret NAME KEY" / "configmap NAME KEY")."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
            if kind in volume:
                source = volume[kind]
                for item in source.get("items", []):
                    path = PurePosixPath(mount["mountPath"]) / item["path"]
                    files[path] = f"{kind} {source[name_key]} {item['key']}"
                if "items" not in source:  # every key, under its own name
                    files[PurePosixPath(mount["mountPath"]) / "*"] = f"{kind} {source[name_key]} *"
    return files


def file_source(files: Mapping[PurePosixPath, str], path: str) -> str | None:
    posix = PurePosixPath(path)
    if posix in files:
        return files[posix]
    wildcard = files.get(posix.parent / "*")
    return wildcard.replace(" *", f" {posix.name}") if wildcard else None


def settings_under(env: Mapping[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``env`` the process environment, with every absolute path moved under
    ``tmp_path`` and every file it names created, so the settings classes can check them."""
    for name in list(os.environ):
        if name.startswith(("IOT_", "INGEST_", "PG", "SSL_CERT")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value.startswith("/"):
            moved = tmp_path / value.lstrip("/")
            if name.endswith(("_FILE", "ROOTCERT")):
                moved.parent.mkdir(parents=True, exist_ok=True)
                moved.write_text("placeholder-from-the-test\n")
            else:
                moved.mkdir(parents=True, exist_ok=True)
            value = str(moved)
        monkeypatch.setenv(name, value)


def test_the_ingest_daemons_get_every_variable_the_code_needs(
    ingest, settings_map, code, tmp_path, monkeypatch
):
    spec = pod_spec(ingest)
    (container,) = spec["containers"]
    env = container_env(container, {"iot-platform-settings": settings_map}, "iot-ingest-0")
    s3 = {n for n in code.names if n.startswith("IOT_S3_")}
    needed = {
        "IOT_BROKER_HOST",
        "IOT_BROKER_PORT",
        "IOT_OBJECT_STORE",
        "IOT_MQTT_MAX_PAYLOAD_BYTES",
    }
    needed |= s3 | {"INGEST_INSTANCE_ID", "INGEST_SHARE_GROUP", "INGEST_SPOOL_DIR"}
    needed |= {"INGEST_METRICS_HOST", "INGEST_METRICS_PORT", "INGEST_SHUTDOWN_TIMEOUT_S"}
    needed |= {"INGEST_CA_FILE", "INGEST_CERT_FILE", "INGEST_KEY_FILE"}
    assert needed <= code.names, f"no code reads {needed - code.names}: update this test"
    missing = sorted(n for n in needed if not outside_dagster(code, n, env))
    assert not missing, f"the ingest daemons lack {missing}"
    unknown = sorted(n for n in env if n not in code.names and n not in LIBRARY_VARIABLES)
    unknown = [n for n in unknown if not (n.endswith("_FILE") and n[:-5] in code.secrets)]
    assert not unknown, f"set for the ingest daemons, read by no code (typo?): {unknown}"
    assert env["IOT_OBJECT_STORE"] == "s3" and env["IOT_S3_SECURE"] == "true", "TLS to MinIO"
    # Every file a variable names is in the pod, from the Secret/ConfigMap key it should be.
    files = mounted_files(spec, container)
    for name in ("IOT_S3_ACCESS_KEY", "IOT_S3_SECRET_KEY"):
        assert name not in env, f"{name} must come as a file (NAME_FILE), not in the environment"
        assert file_source(files, env[f"{name}_FILE"]) == f"secret iot-object-store {name}", name
    tls = {"INGEST_CA_FILE": "ca.crt", "INGEST_CERT_FILE": "tls.crt", "INGEST_KEY_FILE": "tls.key"}
    for name, key in tls.items():
        assert file_source(files, env[name]) == f"secret iot-ingest-mqtt-tls {key}", name
    for name in ("PGSSLROOTCERT", "SSL_CERT_FILE"):
        assert file_source(files, env[name]) == "configMap iot-endpoint-ca ca.crt", name
    # The settings classes accept this environment (types, minimums, cross-checks).
    settings_under(env, tmp_path, monkeypatch)
    settings = IngestSettings.from_env()
    assert settings.subscriptions[0].startswith("$share/ingest/")
    assert settings.metrics_port == int(env["INGEST_METRICS_PORT"])


def test_the_code_locations_get_every_variable_the_code_needs(
    values, settings_map, code, tmp_path, monkeypatch
):
    documented = documented_secrets()
    pg = {n for n in code.names if n.startswith("IOT_PG_")} - {"IOT_PG_BINDIR"}
    s3 = {n for n in code.names if n.startswith("IOT_S3_")}
    needed = {
        "iot-platform": {"IOT_HOME", "IOT_CERTS_DIR", "IOT_OBJECT_STORE", *s3, *pg}
        | set(code.envvars),
        "iot-analytics": pg,
    }
    for name, location in deployments(values).items():
        pod = chart_pods(values)[f"{name} run"]
        container = pod["spec"]["containers"][0]
        env = container_env(container, {"iot-platform-settings": settings_map}, "run")
        from_secrets = {
            key for s in location.get("envSecrets", []) for key in documented[s["name"]]
        }
        missing = sorted(n for n in needed[name] if n not in env and n not in from_secrets)
        assert not missing, f"{name} (code server and run pods) lacks {missing}"
        for variable in from_secrets:
            assert variable not in env, f"{name}: {variable} both in a Secret and in plain config"
        # dg.EnvVar reads the environment only: never a *_FILE for those.
        assert not {f"{n}_FILE" for n in code.envvars} & set(env), name
        settings_under({**env, **{k: "from-a-secret" for k in from_secrets}}, tmp_path, monkeypatch)
        platform = PlatformSettings.from_env()
        HealthSettings.from_env()
        assert not platform.allow_server_keygen, "production enrolls with CSRs only"
        files = mounted_files(pod["spec"], container)
        assert file_source(files, env["PGSSLROOTCERT"]) == "configMap iot-endpoint-ca ca.crt"
        if name == "iot-platform":
            mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
            certs = mounts[PurePosixPath(env["IOT_CERTS_DIR"])]
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert volumes[certs["name"]]["persistentVolumeClaim"]["claimName"] == "iot-certs"
            assert not certs.get("readOnly"), (
                "enroll and revoke runs write certificates and the CRL"
            )


def test_dagster_storage_is_the_external_warehouse_server_over_tls(values, settings_map, objects):
    postgres = values["postgresql"]
    assert postgres["enabled"] is False, "no PostgreSQL inside the chart: an external endpoint"
    assert postgres["postgresqlHost"] == settings_map["IOT_PG_HOST"]
    assert str(postgres["service"]["port"]) == settings_map["IOT_PG_PORT"]
    assert postgres["postgresqlUsername"] == settings_map["IOT_PG_USER"]
    assert postgres["postgresqlDatabase"] == settings_map["IOT_DAGSTER_DB"]
    params = postgres["postgresqlParams"]
    assert params["sslmode"] == settings_map["PGSSLMODE"] == "verify-full"
    assert params["sslrootcert"] == settings_map["PGSSLROOTCERT"]
    # The webserver and daemon open the storage too: the CA file must be in their pods.
    for name in ("webserver", "daemon"):
        pod = chart_pods(values)[name]
        files = mounted_files(pod["spec"], pod["spec"]["containers"][0])
        assert file_source(files, params["sslrootcert"]) == "configMap iot-endpoint-ca ca.crt"
    assert the(objects, "PersistentVolumeClaim", "iot-certs")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ], "run pods on any node write the certificate directory"


# ---- Dagster: the same instance and workspace as the other modes --------------------------


def test_the_run_queue_is_dagster_yamls(values):
    instance = yaml.safe_load((ROOT / "deploy" / "dagster" / "dagster.yaml").read_text())
    coordinator = instance["run_coordinator"]["config"]
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert daemon["runCoordinator"]["type"] == instance["run_coordinator"]["class"]
    assert queued["maxConcurrentRuns"] == coordinator["max_concurrent_runs"]
    assert queued["dequeueIntervalSeconds"] == coordinator["dequeue_interval_seconds"]
    assert queued["tagConcurrencyLimits"] == coordinator["tag_concurrency_limits"]
    assert daemon["runRetries"] == {
        "enabled": instance["run_retries"]["enabled"],
        "maxRetries": instance["run_retries"]["max_retries"],
    }
    for kind in ("sensors", "schedules"):
        assert daemon[kind] == {
            "useThreads": instance[kind]["use_threads"],
            "numWorkers": instance[kind]["num_workers"],
        }
    assert values["telemetry"]["enabled"] is instance["telemetry"]["enabled"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_every_run_pod_requests_resources(values):
    for name, location in deployments(values).items():
        assert "resources" not in location, (
            f"{name}: the chart passes a code server's resources to its run pods, replacing "
            "runK8sConfig's; the code servers get theirs from the LimitRange"
        )
        container = chart_pods(values)[f"{name} run"]["spec"]["containers"][0]
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), f"{name} run pods: {requests}"
        assert "memory" in container["resources"]["limits"], f"{name} run pods: no memory limit"


def test_the_code_locations_are_workspace_yamls(values):
    embedded = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    modules = {
        e["python_module"]["location_name"]: e["python_module"]["module_name"] for e in embedded
    }
    workspace = values["dagsterWebserver"]["workspace"]
    assert workspace["enabled"] is True
    servers = {s["name"]: s for s in workspace["servers"]}
    assert set(servers) == set(modules), "the same location names as workspace.yaml"
    by_name = deployments(values)
    assert len(by_name) == len(servers), "one user-code deployment per location"
    for location, server in servers.items():
        deployment = by_name[server["host"]]  # the chart's Service is named after the deployment
        assert server["port"] == deployment["port"] == USER_CODE_PORT
        args = deployment["dagsterApiGrpcArgs"]
        assert args[args.index("-m") + 1] == modules[location], location
        assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True, (
            f"{location}: run pods must get the code server's settings, Secrets and volumes"
        )


# ---- the ingest daemons --------------------------------------------------------------------


def test_the_ingest_daemons_are_durable_and_observable(objects, ingest, settings_map):
    spec = pod_spec(ingest)
    (container,) = spec["containers"]
    env = container_env(container, {"iot-platform-settings": settings_map}, "iot-ingest-0")
    scripts = pyproject()["project"]["scripts"]
    assert container["command"][0] in scripts, "the ingest command is one of our console scripts"
    assert ingest["spec"]["replicas"] >= 2, "several daemons on one shared subscription"
    validate_instance(f"{ingest['metadata']['name']}-{ingest['spec']['replicas'] - 1}")
    # The spool: one volume per replica (a replacement pod drains what its predecessor
    # acknowledged but had not uploaded), larger than the budget plus one batch.
    claims = {c["metadata"]["name"]: c for c in ingest["spec"]["volumeClaimTemplates"]}
    spool_dir = PurePosixPath(env["INGEST_SPOOL_DIR"])
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if spool_dir == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in spool_dir.parents
    ]
    assert mount["name"] in claims and not mount.get("readOnly")
    size = claims[mount["name"]]["spec"]["resources"]["requests"]["storage"]
    units = {"Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    capacity = int(size[:-2]) * units[size[-2:]]
    assert capacity > int(env["INGEST_SPOOL_MAX_BYTES"]) + 32 * 2**20, f"spool volume {size}"
    # SIGTERM flushes, uploads (or spools) and acks within INGEST_SHUTDOWN_TIMEOUT_S.
    assert spec["terminationGracePeriodSeconds"] > float(env["INGEST_SHUTDOWN_TIMEOUT_S"])
    # Ready only when /healthz says connected; scrapeable from outside the pod.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == int(env["INGEST_METRICS_PORT"])
    assert env["INGEST_METRICS_HOST"] not in {"127.0.0.1", "localhost"}
    assert "httpGet" not in container["livenessProbe"], (
        "/healthz is 503 during a broker outage: as liveness it would restart every daemon"
    )
    # The PDB and the headless Service select exactly these pods.
    labels = ingest["spec"]["template"]["metadata"]["labels"]
    pdb = the(objects, "PodDisruptionBudget", ingest["metadata"]["name"])
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < ingest["spec"]["replicas"]
    service = the(objects, "Service", ingest["spec"]["serviceName"])
    assert service["spec"]["selector"].items() <= labels.items()
    assert ingest["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_pki_one_shot_gets_what_pki_init_needs(
    objects, settings_map, code, tmp_path, monkeypatch
):
    job = the(objects, "Job", "iot-pki-init")
    spec = pod_spec(job)
    (container,) = spec["containers"]
    assert container["command"] == ["iot-platform", "pki", "init"]
    env = container_env(container, {"iot-platform-settings": settings_map}, "iot-pki-init")
    needed = {"IOT_CERTS_DIR", "IOT_CA_PASSPHRASE", "IOT_BROKER_HOST", "IOT_BROKER_SERVICE_NAME"}
    assert not sorted(n for n in needed if not outside_dagster(code, n, env))
    files = mounted_files(spec, container)
    assert file_source(files, env["IOT_CA_PASSPHRASE_FILE"]) == "secret iot-ca IOT_CA_PASSPHRASE"
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    certs = mounts[PurePosixPath(env["IOT_CERTS_DIR"])]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[certs["name"]]["persistentVolumeClaim"]["claimName"] == "iot-certs"
    assert not certs.get("readOnly")
    assert spec["restartPolicy"] == "Never"
    settings_under(env, tmp_path, monkeypatch)
    settings = PlatformSettings.from_env()
    assert settings.broker_service_name != settings.broker_host, "devices dial a public name"


def test_the_crl_distribution_point_is_where_the_certificates_say(
    objects, settings_map, tmp_path, monkeypatch
):
    """IOT_CRL_URL (in every certificate) resolves to the iot-crl Service in this namespace,
    on the port the crl pods listen on, and they serve the CRL the revoke runs write."""
    from urllib.parse import urlsplit

    from iot_platform.crl_http import crl_path_of

    url = urlsplit(settings_map["IOT_CRL_URL"])
    service = the(objects, "Service", "iot-crl")
    namespace = kustomization(BASE)["namespace"]
    assert url.scheme == "http", "EMQX's CRL cache takes http distribution points only"
    assert url.hostname == f"iot-crl.{namespace}.svc.cluster.local"
    assert url.path.endswith(".pem"), "EMQX's cache refresh parses PEM only"
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    deployment = the(objects, "Deployment", "iot-crl")
    spec = pod_spec(deployment)
    assert service["spec"]["selector"].items() <= spec_labels(deployment).items()
    (container,) = spec["containers"]
    (container_port,) = container["ports"]
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    argv = container["command"]
    assert argv[:3] == ["iot-platform", "crl", "serve"]
    assert argv[argv.index("--port") + 1] == str(container_port["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert crl_path_of(settings_map["IOT_CRL_URL"]) != "/healthz"
    env = container_env(container, {"iot-platform-settings": settings_map}, "iot-crl")
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    certs = mounts[PurePosixPath(env["IOT_CERTS_DIR"])]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[certs["name"]]["persistentVolumeClaim"]["claimName"] == "iot-certs"
    assert certs.get("readOnly"), "it only reads the CRL"
    assert not any("PASSPHRASE" in name for name in env), "it never needs the CA key"
    settings_under(env, tmp_path, monkeypatch)
    assert PlatformSettings.from_env().crl_url == settings_map["IOT_CRL_URL"]


def spec_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


# ---- only operators reach the UI -------------------------------------------------------------


def chart_ingress(values: Mapping[str, Any]) -> dict[str, Any]:
    """The Ingress the chart renders for the webserver from ``values['ingress']``."""
    ingress = values["ingress"]
    web = ingress["dagsterWebserver"]
    spec: dict[str, Any] = {
        "ingressClassName": ingress["ingressClassName"],
        "rules": [
            {
                "host": web["host"],
                "http": {
                    "paths": [
                        {
                            "path": web["path"],
                            "pathType": web["pathType"],
                            "backend": {
                                "service": {
                                    "name": "dagster-dagster-webserver",
                                    "port": {
                                        "number": values["dagsterWebserver"]["service"]["port"]
                                    },
                                }
                            },
                        }
                    ]
                },
            }
        ],
    }
    if web["tls"]["enabled"]:
        spec["tls"] = [{"hosts": [web["host"]], "secretName": web["tls"]["secretName"]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "dagster", "annotations": ingress["annotations"]},
        "spec": spec,
    }


def test_the_ui_is_loopback_only_or_authenticated(values, ingress_values, objects):
    # Loopback only: the default values publish nothing; port-forward binds 127.0.0.1.
    assert not values.get("ingress", {}).get("enabled"), "dagster-values.yaml: no ingress"
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    # Every values file that opens an ingress opens it behind oauth2-proxy, over TLS, and
    # none publishes the webserver's Service itself.
    opened = []
    for path in sorted(K8S.glob("dagster-values*.yaml")):
        layer = yaml.safe_load(path.read_text())
        service = layer.get("dagsterWebserver", {}).get("service", {})
        assert service.get("type", "ClusterIP") == "ClusterIP", f"{path.name} publishes the UI"
        if layer.get("ingress", {}).get("enabled"):
            opened.append(path.name)
    assert opened == [INGRESS_VALUES.name], f"ingresses: {opened}"
    merged = {**values, **ingress_values}
    ingress = chart_ingress(merged)
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)
    annotations = ingress["metadata"]["annotations"]
    auth = re.fullmatch(
        r"http://([a-z0-9-]+)\.iot\.svc\.cluster\.local:(\d+)/oauth2/auth",
        annotations["nginx.ingress.kubernetes.io/auth-url"],
    )
    assert auth, "every request to the UI is checked by oauth2-proxy's /oauth2/auth"
    service = the(objects, "Service", auth.group(1))
    assert int(auth.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    assert ingress["spec"]["tls"], "credentials and session cookies only over TLS"
    proxy = the(objects, "Deployment", auth.group(1))
    assert service["spec"]["selector"].items() <= (
        proxy["spec"]["template"]["metadata"]["labels"].items()
    )
    args = pod_spec(proxy)["containers"][0]["args"]
    assert "--upstream=static://202" in args, "an auth endpoint, not a second way to the UI"
    assert "--skip-jwt-bearer-tokens=true" in args, "the operator CLI sends a bearer token"
    assert not [a for a in args if a.startswith(("--skip-auth", "--whitelist"))], args
    # The login flow's paths live on the UI's host.
    (login,) = [o for o in objects if o["kind"] == "Ingress"]
    assert login["spec"]["rules"][0]["host"] == ingress["spec"]["rules"][0]["host"]
