"""The embedded stack's workspace: every code location of workspace.yaml, served over gRPC."""

from __future__ import annotations

import yaml

from iot_platform.stack import WORKSPACE, code_locations, workspace_of


def test_every_location_of_the_workspace_gets_a_code_server_of_its_own() -> None:
    locations = code_locations(WORKSPACE)
    declared = yaml.safe_load(WORKSPACE.read_text())["load_from"]
    assert [(loc.name, loc.module) for loc in locations] == [
        (e["python_module"]["location_name"], e["python_module"]["module_name"]) for e in declared
    ]
    assert len({loc.port for loc in locations}) == len(locations)

    served = workspace_of(locations)["load_from"]
    assert served == [
        {"grpc_server": {"host": "127.0.0.1", "port": loc.port, "location_name": loc.name}}
        for loc in locations
    ]
