"""`iot-platform dashboards import` (embedded mode): the warehouse's read-only role gets a
login on the real PostgreSQL, and Grafana's HTTP API receives the folder, the provisioned
datasources with this machine's addresses and every dashboard.

No Grafana can run here (not packaged for Debian, no internet), so the API side is a
recorder on loopback that answers as Grafana's API documents (404 for an unknown
datasource uid, 412 for an existing folder); what is checked against real parts is the
warehouse login the imported datasource carries.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from iot_platform.cli import main
from iot_platform.warehouse.migrations import GRAFANA_ROLE
from tests.grafana import dashboards

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "grafana-admin-pw-123"  # the test Grafana's basic-auth password


class FakeGrafanaApi:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None, object]] = []
        self.datasources: dict[str, dict] = {}
        self.folders: set[str] = set()


@pytest.fixture
def grafana_api() -> Iterator[tuple[FakeGrafanaApi, str]]:
    api = FakeGrafanaApi()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length)) if length else None
            api.requests.append((self.command, self.path, self.headers["Authorization"], body))
            route = (self.command, self.path)
            if route == ("POST", "/api/folders"):
                if body["uid"] in api.folders:
                    return self._answer(412, {"message": "a folder with that uid exists"})
                api.folders.add(body["uid"])
                return self._answer(200, {"uid": body["uid"]})
            if self.path.startswith("/api/datasources/uid/"):
                uid = self.path.rsplit("/", 1)[-1]
                if self.command == "GET":
                    found = uid in api.datasources
                    return self._answer(200 if found else 404, api.datasources.get(uid, {}))
                api.datasources[uid] = body
                return self._answer(200, {"message": "Datasource updated"})
            if route == ("POST", "/api/datasources"):
                api.datasources[body["uid"]] = body
                return self._answer(200, {"message": "Datasource added"})
            if route == ("POST", "/api/dashboards/db"):
                uid = body["dashboard"]["uid"]
                return self._answer(200, {"status": "success", "url": f"/d/{uid}/x"})
            return self._answer(404, {"message": "not found"})

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, *_args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield api, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def embedded_env(postgres_db, tmp_path, monkeypatch) -> dict:
    params = psycopg.conninfo.conninfo_to_dict(postgres_db)
    env = {
        "IOT_HOME": str(tmp_path / "home"),
        "IOT_PG_HOST": params["host"],
        "IOT_PG_PORT": str(params["port"]),
        "IOT_PG_USER": params["user"],
        "IOT_PG_PASSWORD": params["password"],
        "IOT_PG_DB": params["dbname"],
        "IOT_GRAFANA_USER": "admin",
        "IOT_GRAFANA_PASSWORD": ADMIN_PASSWORD,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("IOT_GRAFANA_DB_PASSWORD", raising=False)
    monkeypatch.delenv("IOT_GRAFANA_TOKEN", raising=False)
    return params


def test_import_creates_everything_and_the_datasource_logs_in(
    grafana_api, embedded_env, tmp_path, capsys
):
    api, url = grafana_api
    argv = ["dashboards", "import", "--grafana-url", url, "--prometheus-url", "http://p:9090"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    boards = dashboards()
    for board in boards.values():
        assert f"{url}/d/{board['uid']}/x" in printed

    basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    assert {auth for _, _, auth, _ in api.requests} == {basic}
    posted = [body for m, p, _, body in api.requests if (m, p) == ("POST", "/api/dashboards/db")]
    assert sorted(b["dashboard"]["uid"] for b in posted) == sorted(
        b["uid"] for b in boards.values()
    )
    assert all(b["folderUid"] == "iot-platform" and b["overwrite"] for b in posted)

    warehouse = api.datasources["iot-warehouse"]
    assert warehouse["url"] == f"{embedded_env['host']}:{embedded_env['port']}"
    assert warehouse["jsonData"]["database"] == embedded_env["dbname"]
    assert warehouse["user"] == GRAFANA_ROLE
    assert api.datasources["iot-prometheus"]["url"] == "http://p:9090"
    password = warehouse["secureJsonData"]["password"]
    assert password not in printed and ADMIN_PASSWORD not in printed
    generated = tmp_path / "home" / "secrets" / "grafana_db_password"
    assert generated.read_text().strip() == password
    assert generated.stat().st_mode & 0o077 == 0

    # What Grafana will do with that datasource, on the real warehouse:
    reader = psycopg.conninfo.make_conninfo(
        host=embedded_env["host"],
        port=embedded_env["port"],
        dbname=embedded_env["dbname"],
        user=warehouse["user"],
        password=password,
    )
    with psycopg.connect(reader) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO devices (device_id) VALUES ('x')")

    # Again: datasources replaced (PUT), the folder kept, the same generated password.
    assert main(argv) == 0
    methods = [(m, p) for m, p, _, _ in api.requests]
    assert ("PUT", "/api/datasources/uid/iot-warehouse") in methods
    assert api.datasources["iot-warehouse"]["secureJsonData"]["password"] == password


def test_a_refusing_grafana_fails_with_its_answer(grafana_api, embedded_env, capsys):
    _api, url = grafana_api
    assert main(["dashboards", "import", "--grafana-url", url + "/nope"]) == 1
    err = capsys.readouterr().err
    assert "Grafana refused the import" in err and "404" in err
    assert ADMIN_PASSWORD not in err
