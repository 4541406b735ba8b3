"""Only operators reach the UI: a real nginx (Debian's) with the project's proxy config
(deploy/ui-auth/nginx.conf.template) in front of a real dagster-webserver on loopback.

Without credentials, or with wrong ones, the exposed endpoint answers 401 to the UI and to
the GraphQL API; the operator CLI's client (``JobLauncher.from_settings``, as
``iot-platform devices enroll`` builds it) launches a job through the proxy with the
credentials from IOT_DAGSTER_AUTH_HEADER_FILE, which never appear in its output or errors.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from string import Template

import pytest
import requests

from iot_platform.launcher import JobLauncher, LaunchError
from iot_platform.services.process import ChildProcess, ServiceError, free_port
from iot_platform.settings import PlatformSettings, Secret

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "ui-auth" / "nginx.conf.template"
BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"

DEFINITIONS = """
import dagster as dg


@dg.op
def hello() -> int:
    return 1


@dg.job
def noop() -> None:
    hello()


defs = dg.Definitions(jobs=[noop])
"""


def ssha(password: str) -> str:
    """An htpasswd entry's hash in nginx's salted-SHA format."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 (nginx's format)
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _started(process: ChildProcess, url: str, timeout: float) -> ChildProcess:
    def answers() -> bool:
        try:
            return requests.get(url, timeout=2).status_code < 500
        except requests.RequestException:
            return False

    try:
        process.start().wait_until(answers, timeout=timeout, what=url)
    except ServiceError as exc:
        pytest.fail(f"could not start {process.name}: {exc}", pytrace=False)
    return process


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real dagster-webserver on loopback with a one-job code location; its address."""
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster.core.run_coordinator\n"
        "  class: DefaultRunCoordinator\ntelemetry:\n  enabled: false\n"
    )
    (home / "defs.py").write_text(DEFINITIONS)
    port = free_port()
    process = ChildProcess(
        "dagster-webserver",
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-f", "defs.py"],
        home / "webserver.log",
        env={"PATH": f"{BIN}:/usr/bin:/bin", "DAGSTER_HOME": str(home), "HOME": str(home)},
        cwd=home,
    )
    _started(process, f"http://127.0.0.1:{port}/server_info", timeout=120)
    yield f"127.0.0.1:{port}"
    process.stop()


@pytest.fixture(scope="module")
def operator() -> tuple[str, str]:
    return "operator", secrets.token_urlsafe(18)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, webserver: str, operator) -> Iterator[str]:
    """Debian's nginx running the project's server block; its URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: scripts/bootstrap.sh --dev installs it")
    prefix = tmp_path_factory.mktemp("nginx")
    user, password = operator
    htpasswd = prefix / "htpasswd"
    htpasswd.write_text(f"{user}:{ssha(password)}\n")
    port = free_port()
    server = Template(TEMPLATE.read_text()).safe_substitute(
        IOT_UI_AUTH_LISTEN=f"127.0.0.1:{port}",
        IOT_UI_AUTH_UPSTREAM=webserver,
        IOT_UI_AUTH_HTPASSWD=str(htpasswd),
    )
    assert "${IOT_UI_AUTH" not in server, "a placeholder of the template was not rendered"
    (prefix / "server.conf").write_text(server)
    # One process, no privilege drop (master_process off): the files stay in pytest's tree.
    (prefix / "nginx.conf").write_text(
        textwrap.dedent(f"""\
            daemon off;
            master_process off;
            pid {prefix}/nginx.pid;
            error_log stderr notice;
            events {{}}
            http {{
                access_log off;
                client_body_temp_path {prefix}/client_body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
                include {prefix}/server.conf;
            }}
            """)
    )
    process = ChildProcess(
        "nginx",
        [nginx, "-p", str(prefix), "-e", "stderr", "-c", str(prefix / "nginx.conf")],
        prefix / "nginx.log",
    )
    url = f"http://127.0.0.1:{port}"
    _started(process, f"{url}/server_info", timeout=30)
    yield url
    process.stop()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_unauthenticated_requests_are_refused(proxy, operator):
    user, password = operator
    query = {"query": "{ version }"}
    assert requests.get(f"{proxy}/", timeout=10).status_code == 401
    assert requests.post(f"{proxy}/graphql", json=query, timeout=10).status_code == 401
    wrong = {"Authorization": basic(user, password + "x")}
    assert (
        requests.post(f"{proxy}/graphql", json=query, headers=wrong, timeout=10).status_code == 401
    )
    right = {"Authorization": basic(user, password)}
    answer = requests.post(f"{proxy}/graphql", json=query, headers=right, timeout=10)
    assert answer.status_code == 200 and answer.json()["data"]["version"]


def cli_launcher(monkeypatch, proxy: str, header_file: Path | None) -> JobLauncher:
    """The launcher the operator CLI builds, from the environment it would see."""
    monkeypatch.setenv("IOT_DAGSTER_URL", proxy + "/")
    monkeypatch.delenv("IOT_DAGSTER_AUTH_HEADER", raising=False)
    if header_file is None:
        monkeypatch.delenv("IOT_DAGSTER_AUTH_HEADER_FILE", raising=False)
    else:
        monkeypatch.setenv("IOT_DAGSTER_AUTH_HEADER_FILE", str(header_file))
    return JobLauncher.from_settings(PlatformSettings.from_env(), timeout_s=120)


def test_the_cli_client_launches_through_the_proxy_with_its_credentials(
    proxy, operator, tmp_path, monkeypatch, capsys, caplog
):
    user, password = operator
    header_file = tmp_path / "dagster-auth"
    header_file.write_text(basic(user, password) + "\n")
    caplog.set_level(logging.DEBUG)

    refused = cli_launcher(monkeypatch, proxy, None)
    with pytest.raises(LaunchError) as without:
        refused.run("noop", {})

    outcome = cli_launcher(monkeypatch, proxy, header_file).run("noop", {})
    assert outcome.succeeded, outcome.errors
    assert outcome.url.startswith(proxy + "/runs/")

    header_file.write_text(basic(user, "not-the-password") + "\n")
    with pytest.raises(LaunchError) as wrong:
        cli_launcher(monkeypatch, proxy, header_file).run("noop", {})

    seen = "\n".join([str(without.value), str(wrong.value), caplog.text, *capsys.readouterr()])
    assert "401" in str(without.value) or "Unauthorized" in str(without.value), without.value
    for leaked in (password, basic(user, password), basic(user, "not-the-password")):
        assert leaked not in seen, "a credential reached an error message or the log"


def test_credentials_never_travel_in_clear_text_off_loopback():
    with pytest.raises(LaunchError, match="plain http"):
        JobLauncher("http://dagster.example.internal", auth_header=Secret("Bearer abc"))
    launcher = JobLauncher(
        "https://dagster.example.internal:443/", auth_header=Secret("Bearer abc")
    )
    assert launcher.base_url == "https://dagster.example.internal:443"
    # Loopback may stay plain http, IPv6 literal included, and the URL is kept as written.
    ipv6 = JobLauncher("http://[::1]:3000/dagster", auth_header=Secret("Bearer abc"))
    assert ipv6.base_url == "http://[::1]:3000/dagster"
