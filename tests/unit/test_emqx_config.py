"""EMQX's configuration as `iot-platform broker config --broker emqx` renders it, checked
statically (no EMQX can run on the development machines: no Docker engine, no package).

What is checked, and why it can fail:

* the files it names are the ones ``pki init`` writes (a real PKI in a temporary folder);
* mutual TLS is the only way in (plain and websocket listeners off, a client certificate
  required), the certificate CN is the username, the payload limit and the inflight/queue
  limits follow the settings the Mosquitto config uses;
* the ACL, evaluated rule by rule the way EMQX's file authorizer does (first match wins,
  MQTT wildcards, ``${username}`` = the CN), allows and refuses exactly what Mosquitto's ACL
  does for the same identities: every family of ``iot_platform.topics`` under the device's
  own id, nothing under another id or outside the families, everything for the ingest
  identity through its shared subscriptions, and nothing at all for a revoked identity.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ingest_daemon.config import IngestSettings
from iot_platform.broker_control import INGEST_IDENTITY, write_denied_identities
from iot_platform.cli import main
from iot_platform.services.emqx import EMQX_MAX_INFLIGHT, EmqxConfig
from iot_platform.settings import PlatformSettings
from iot_platform.topics import DEVICE_READS, FAMILIES, ingest_subscriptions

RULE = re.compile(r"^\{(allow|deny), (.+?)(?:, (publish|subscribe|all), \[(.*)\])?\}\.$")


@pytest.fixture
def certs(ca, tmp_path) -> Path:
    """A copy of a real PKI (the session CA fixture stays untouched)."""
    return Path(shutil.copytree(ca.certs_dir, tmp_path / "certs"))


def render(certs: Path, tmp_path: Path, denied: list[str] = ()) -> tuple[str, str]:
    write_denied_identities(certs, list(denied))
    return EmqxConfig(port=8883, certs_dir=certs, config_dir=tmp_path / "emqx").render()


# ---- a model of EMQX's file authorizer -------------------------------------------------------


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a topic (or a requested filter) by a rule's filter."""
    if topic.startswith("$") != topic_filter.startswith("$"):
        return False
    rule, name = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(rule):
        if level == "#":
            return True
        if i >= len(name) or (level != "+" and level != name[i]):
            return False
    return len(rule) == len(name)


def allowed(acl: str, username: str, action: str, topic: str) -> bool:
    for line in acl.splitlines():
        if not line.startswith("{"):
            continue
        match = RULE.match(line)
        assert match, f"an ACL line the model does not read: {line}"
        permission, who, rule_action, topics = match.groups()
        if who != "all":
            (user,) = re.fullmatch(r'\{username, "(.+)"\}', who).groups()
            if user != username:
                continue
        if rule_action not in (None, "all", action):
            continue
        filters = re.findall(r'"((?:[^"\\]|\\.)*)"', topics or '"#"')
        filters = [f.replace("${username}", username) for f in filters]
        if topics is None or any(topic_matches(f, topic) for f in filters):
            return permission == "allow"
    return False  # authorization.no_match = deny


# ---- the tests ------------------------------------------------------------------------------


def test_only_mutual_tls_gets_in_and_the_cn_is_the_username(certs, tmp_path):
    conf, _acl = render(certs, tmp_path)
    for listener in ("tcp", "ws", "wss"):
        assert f"listeners.{listener}.default.enable = false" in conf, listener
    assert re.search(r"verify = verify_peer\n\s*fail_if_no_peer_cert = true", conf)
    assert "mqtt.peer_cert_as_username = cn" in conf
    assert "${" not in conf, "a placeholder of the template was not substituted"
    assert conf.count("{") == conf.count("}"), "unbalanced HOCON"
    # Every file it names exists where pki init wrote it.
    for key in ("cacertfile", "certfile", "keyfile"):
        (path,) = re.findall(rf'(?<![a-z]){key} = "([^"]+)"', conf)
        assert Path(path).is_file() and Path(path).parent == certs, f"{key} {path}"


def test_limits_follow_the_settings(certs, tmp_path, monkeypatch):
    monkeypatch.setenv("IOT_CERTS_DIR", str(certs))
    settings = PlatformSettings.from_env()
    ingest = IngestSettings.from_env()
    conf, _acl = render(certs, tmp_path)
    packet = int(re.search(r"mqtt\.max_packet_size = (\d+)", conf).group(1))
    assert packet > settings.mqtt_max_payload_bytes, "a payload at the limit must pass"
    inflight = int(re.search(r"mqtt\.max_inflight = (\d+)", conf).group(1))
    assert inflight == min(settings.broker_max_inflight, EMQX_MAX_INFLIGHT)
    # A daemon's batch must fit in its window, or it never fills before the acks it waits for.
    assert inflight >= ingest.max_rows
    assert f"mqtt.max_mqueue_len = {settings.broker_max_queued}" in conf
    (acl_path,) = re.findall(r'path = "([^"]+)"', conf)
    assert Path(acl_path) == tmp_path / "emqx" / "acl.conf"


def test_the_acl_allows_exactly_what_mosquittos_does(certs, tmp_path):
    _conf, acl = render(certs, tmp_path)
    device, other = "meter-001", "meter-002"
    for family in FAMILIES:
        own = family.subscription().replace("+", device, 1).replace("+", "x")
        theirs = own.replace(device, other, 1)
        assert allowed(acl, device, "publish", own) is family.device_publishes, own
        assert not allowed(acl, device, "publish", theirs), theirs
        assert not allowed(acl, device, "publish", own + "/extra"), own + "/extra"
        reads = any(topic_matches(r.replace("%u", device), own) for r in DEVICE_READS)
        assert allowed(acl, device, "subscribe", own) is reads, f"subscribe {own}"
    assert allowed(acl, device, "subscribe", f"iot/{device}/command/#")
    assert not allowed(acl, device, "subscribe", f"iot/{other}/command/#")
    assert not allowed(acl, device, "publish", f"iot/{device}/Telemetry")
    assert not allowed(acl, device, "subscribe", "#")
    for subscription in ingest_subscriptions():
        assert allowed(acl, INGEST_IDENTITY, "subscribe", f"$share/ingest/{subscription}")
        assert allowed(acl, INGEST_IDENTITY, "subscribe", subscription)
        assert not allowed(acl, device, "subscribe", f"$share/ingest/{subscription}")
    assert not allowed(acl, INGEST_IDENTITY, "publish", f"iot/{device}/telemetry")


def test_a_revoked_identity_is_refused_everything_but_the_ingest_never_is(certs, tmp_path):
    _conf, acl = render(certs, tmp_path, denied=["meter-001", INGEST_IDENTITY])
    for family in FAMILIES:
        own = family.subscription().replace("+", "meter-001", 1).replace("+", "x")
        assert not allowed(acl, "meter-001", "publish", own), own
        assert allowed(acl, "meter-002", "publish", own.replace("meter-001", "meter-002", 1)) is (
            family.device_publishes
        )
    assert not allowed(acl, "meter-001", "subscribe", "iot/meter-001/command/#")
    assert allowed(acl, INGEST_IDENTITY, "subscribe", "$share/ingest/iot/+/telemetry")


def test_the_cli_renders_it(certs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IOT_CERTS_DIR", str(certs))
    out = tmp_path / "out"
    assert main(["broker", "config", "--broker", "emqx", "--out-dir", str(out)]) == 0
    conf = (out / "emqx.conf").read_text()
    assert f'path = "{out / "acl.conf"}"' in conf
    assert "{deny, all}." in (out / "acl.conf").read_text()
    assert main(["broker", "config", "--out-dir", str(out)]) == 2, "mosquitto needs --data-dir"
    assert "--data-dir" in capsys.readouterr().err


def test_with_a_crl_url_the_listener_checks_revocation(certs, tmp_path):
    url = "http://iot-crl.iot.svc.cluster.local:8088/crl.pem"
    write_denied_identities(certs, ["meter-001"])
    emqx = EmqxConfig(port=8883, certs_dir=certs, config_dir=tmp_path / "emqx", crl_url=url)
    conf, acl = emqx.render()
    # Inside the SSL listener's ssl_options, with the peer verified (EMQX needs both).
    ssl_options = re.search(r"listeners\.ssl\.default \{.*?ssl_options \{(.*?)\n  \}", conf, re.S)
    assert ssl_options, "no ssl_options block in the SSL listener"
    assert re.search(r"^\s*enable_crl_check = true$", ssl_options.group(1), re.M)
    assert re.search(r"^\s*verify = verify_peer$", ssl_options.group(1), re.M)
    cache = re.search(r"^crl_cache \{\n(.*?)\n\}", conf, re.S | re.M)
    assert cache, "no top-level crl_cache block"
    assert re.search(r"^\s*refresh_interval = 1m$", cache.group(1), re.M)
    assert "${" not in conf and conf.count("{") == conf.count("}")
    assert not allowed(acl, "meter-001", "publish", "iot/meter-001/telemetry"), (
        "the ACL's deny rules stay: they also cut sessions opened before the revocation"
    )


def test_without_a_crl_url_there_is_no_crl_check_and_the_cli_says_so(
    certs, tmp_path, monkeypatch, capsys
):
    conf, _acl = render(certs, tmp_path)
    assert "enable_crl_check" not in conf
    assert not re.search(r"^crl_cache", conf, re.M)
    monkeypatch.setenv("IOT_CERTS_DIR", str(certs))
    monkeypatch.delenv("IOT_CRL_URL", raising=False)
    assert main(["broker", "config", "--broker", "emqx", "--out-dir", str(tmp_path / "o")]) == 0
    assert "WARNING: IOT_CRL_URL is not set" in capsys.readouterr().err
    monkeypatch.setenv("IOT_CRL_URL", "http://crl.example:8088/crl.pem")
    assert main(["broker", "config", "--broker", "emqx", "--out-dir", str(tmp_path / "o")]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert "enable_crl_check = true" in (tmp_path / "o" / "emqx.conf").read_text()
