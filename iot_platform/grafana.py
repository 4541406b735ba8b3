"""Import the platform's dashboards into a Grafana of the operator's choosing (HTTP API).

The compose stack provisions Grafana from files (``deploy/grafana/``). The embedded stack
runs no Grafana (it is not packaged for Debian), so ``iot-platform dashboards import``
does over Grafana's HTTP API what provisioning does at start: the folder, the two
datasources with the uids the dashboards reference, and the dashboards themselves, all
from the same files. Datasources are the provisioned ones with this machine's addresses;
the warehouse one logs in as the read-only role of the migrations.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests
import yaml  # type: ignore[import-untyped]  # PyYAML (a dependency of dagster) ships no stubs

from iot_platform.settings import PROJECT_ROOT, Secret, SettingsError

GRAFANA_DIR = PROJECT_ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "iot.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "iot.yml"
WAREHOUSE_UID = "iot-warehouse"
PROMETHEUS_UID = "iot-prometheus"


class GrafanaError(RuntimeError):
    """Grafana refused a request; the message names the request and Grafana's answer."""


@dataclass(frozen=True)
class Grafana:
    """A Grafana HTTP API: a service-account token, or basic auth (user + password)."""

    url: str
    token: Secret | None = None
    user: str = ""
    password: Secret | None = None
    timeout_s: float = 15.0

    def _auth(self) -> str:
        if self.token is not None:
            return f"Bearer {self.token.value}"
        if self.user and self.password is not None:
            pair = f"{self.user}:{self.password.value}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        raise SettingsError("set IOT_GRAFANA_TOKEN, or IOT_GRAFANA_USER and IOT_GRAFANA_PASSWORD")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON answer); 4xx answers are returned, other failures raise."""
        try:
            answer = requests.request(
                method,
                self.url.rstrip("/") + path,
                json=body,
                headers={"Authorization": self._auth()},
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            raise GrafanaError(
                f"{method} {path}: Grafana at {self.url} unreachable: {exc}"
            ) from None
        if answer.ok or (400 <= answer.status_code < 500 and answer.status_code not in (401, 403)):
            try:
                return answer.status_code, answer.json() if answer.content else None
            except ValueError:
                return answer.status_code, answer.text[:300]
        raise GrafanaError(f"{method} {path}: HTTP {answer.status_code} {answer.text[:300]}")


@dataclass(frozen=True)
class Targets:
    """What this machine's datasources point at."""

    pg_host: str
    pg_port: int
    pg_database: str
    reader_password: Secret  # of the warehouse's read-only Grafana role
    prometheus_url: str


def provisioned_datasources(targets: Targets) -> list[dict[str, Any]]:
    """The datasources of ``deploy/grafana/provisioning`` with this machine's addresses."""
    sources = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]
    result = []
    for source in sources:
        # provisioning-only keys; and a Grafana of the user's keeps its own default datasource
        source = {k: v for k, v in source.items() if k not in ("editable", "isDefault")}
        if source["uid"] == WAREHOUSE_UID:
            source["url"] = f"{targets.pg_host}:{targets.pg_port}"
            source["jsonData"] = {**source["jsonData"], "database": targets.pg_database}
            source["secureJsonData"] = {"password": targets.reader_password.value}
        elif source["uid"] == PROMETHEUS_UID:
            source["url"] = targets.prometheus_url
        result.append(source)
    return result


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))]


def import_all(grafana: Grafana, targets: Targets) -> list[str]:
    """Folder, datasources, dashboards (created or replaced); returns the dashboard URLs."""
    if urllib.parse.urlsplit(grafana.url).scheme not in ("http", "https"):
        raise SettingsError(f"--grafana-url {grafana.url!r} must be an http(s) URL")
    [provider] = yaml.safe_load(DASHBOARD_PROVIDER_FILE.read_text())["providers"]
    folder = {"uid": provider["folderUid"], "title": provider["folder"]}
    status, answer = grafana.call("POST", "/api/folders", folder)
    if status not in (200, 409, 412):  # 409/412: the folder exists (by title or uid)
        raise GrafanaError(f"POST /api/folders: HTTP {status} {answer}")
    for source in provisioned_datasources(targets):
        path = f"/api/datasources/uid/{source['uid']}"
        status, _ = grafana.call("GET", path)
        status, answer = (
            grafana.call("PUT", path, source)
            if status == 200
            else grafana.call("POST", "/api/datasources", source)
        )
        if status != 200:
            raise GrafanaError(f"datasource {source['uid']}: HTTP {status} {answer}")
    urls = []
    for board in dashboards():
        body = {"dashboard": board, "folderUid": folder["uid"], "overwrite": True}
        status, answer = grafana.call("POST", "/api/dashboards/db", body)
        if status != 200:
            raise GrafanaError(f"dashboard {board['uid']}: HTTP {status} {answer}")
        urls.append(grafana.url.rstrip("/") + str(answer.get("url", f"/d/{board['uid']}")))
    return urls


def dashboards_present() -> bool:
    """False when running from an installed package without the checkout's deploy/."""
    return DATASOURCES_FILE.is_file() and any(DASHBOARD_DIR.glob("*.json"))
