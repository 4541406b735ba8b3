"""The Dagster UI is reachable from loopback only, or through an authenticating proxy:
its open-source UI has no login and launches enroll_device and revoke_certificate.

Compose publishes it on 127.0.0.1 whatever IOT_PUBLISH_ADDR says (the Kubernetes side is
checked in test_k8s_static.py; the proxy itself in tests/integration/test_ui_auth.py)."""

from __future__ import annotations

import yaml

from tests.unit.test_compose_static import COMPOSE_FILE, ENV_EXAMPLE, parse_env_file, resolve


def test_compose_publishes_the_ui_on_loopback_only():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    everywhere = {**parse_env_file(ENV_EXAMPLE), "IOT_PUBLISH_ADDR": "0.0.0.0"}  # noqa: S104
    services = resolve(raw, everywhere)["services"]
    ports = services["dagster-webserver"]["ports"]
    assert ports, "the UI is not published at all"
    for port in ports:
        assert str(port).startswith("127.0.0.1:"), f"the UI published beyond loopback: {port}"
