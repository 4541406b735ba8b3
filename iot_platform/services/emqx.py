"""EMQX, the scale-out broker: its configuration rendered from the same facts as Mosquitto's.

Mosquitto is single-threaded and does not cluster; EMQX does. Both brokers get the same
identity rules from the same sources: mutual TLS only with the certificate CN as the
username, the per-identity ACL from the topic families (``iot_platform.topics``), the
revoked identities that revocation publishes next to the CRL, the ingest identity that
reads everything (also through ``$share`` groups), the one payload limit and the limits
sized for the ingest daemons' batched acks.

One difference the deployment must know: EMQX checks certificate revocation only through the
CRL distribution point URL in each client certificate, never from a file. With
``IOT_CRL_URL`` set, every certificate the CA issues names it, ``iot-platform crl serve``
answers there, and the listener checks it (``enable_crl_check``): a revoked certificate's
handshake is refused once EMQX's cached CRL is refreshed (``crl_cache.refresh_interval``).
Without it, revocation reaches EMQX only through the deny rules of its ACL (a revoked
identity is disconnected on its next publish or subscribe), which it must re-read after a
revocation. The deny rules stay either way: they also cut sessions already open, which a
CRL check at the handshake does not (docs/kubernetes.md, "EMQX").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from iot_platform.broker_control import INGEST_IDENTITY, read_denied_identities, template
from iot_platform.pki import write_public
from iot_platform.settings import MQTT_MAX_PACKET_BYTES, PlatformSettings
from iot_platform.topics import DEVICE_READS, FAMILIES

# Mosquitto's ACL placeholder for the username (topics.py writes its patterns with it) and
# EMQX's spelling of the same.
MOSQUITTO_USERNAME = "%u"
EMQX_USERNAME = "${username}"
# EMQX limits whole packets, Mosquitto payloads: a publish carries at most a 2-byte length
# and a 65,535-byte topic, a packet id and its properties on top of the payload.
PACKET_ALLOWANCE = 2 + 65_535 + 2 + 4096
EMQX_MAX_INFLIGHT = 65_535  # the largest mqtt.max_inflight EMQX accepts
# How often EMQX re-fetches a cached CRL: the longest a revoked certificate can still
# complete a handshake. One minute is the least emqx_crl_cache accepts (MIN_REFRESH_PERIOD).
CRL_REFRESH_INTERVAL = "1m"
CRL_HTTP_TIMEOUT = "15s"


def _quoted(topics: list[str]) -> str:
    """An Erlang list of strings (JSON string escaping is valid Erlang for these)."""
    return "[" + ", ".join(json.dumps(topic) for topic in topics) + "]"


def device_rules() -> str:
    """The device ACL rules: each family's write pattern and each read, for the CN."""
    writes = [f.acl_write() for f in FAMILIES if f.device_publishes]

    def emqx(patterns: list[str] | tuple[str, ...]) -> list[str]:
        return [p.replace(MOSQUITTO_USERNAME, EMQX_USERNAME) for p in patterns]

    return "\n".join(
        [
            f"{{allow, all, publish, {_quoted(emqx(writes))}}}.",
            f"{{allow, all, subscribe, {_quoted(emqx(DEVICE_READS))}}}.",
        ]
    )


def render_acl(ingest_user: str, denied: list[str]) -> str:
    denied = [identity for identity in denied if identity != ingest_user]
    denied_rules = "\n".join(
        f'{{deny, {{username, {json.dumps(identity)}}}, all, ["#"]}}.' for identity in denied
    )
    return template("emqx_acl.conf.tmpl").substitute(
        denied_rules=denied_rules or "%% (none)",
        device_rules=device_rules(),
        ingest_user=ingest_user,
    )


@dataclass(frozen=True)
class EmqxConfig:
    """Values substituted into the emqx.conf and acl.conf templates."""

    port: int
    certs_dir: Path
    config_dir: Path
    bind_address: str = "0.0.0.0"  # noqa: S104 (the broker's listener, reached by devices)
    max_inflight: int = 50_000
    max_queued: int = 1_000_000
    payload_limit: int = field(
        default_factory=lambda: PlatformSettings.from_env().mqtt_max_payload_bytes
    )
    ingest_user: str = INGEST_IDENTITY
    crl_url: str = ""  # IOT_CRL_URL: "" leaves revocation to the ACL's deny rules

    def crl_blocks(self) -> tuple[str, str]:
        """(the listener's CRL check, the crl_cache block), or comments saying why not."""
        if not self.crl_url:
            return (
                "    # No CRL check: IOT_CRL_URL is not set, so the certificates name no CRL\n"
                "    # distribution point, the only place EMQX reads CRLs from. A revoked\n"
                "    # device is stopped by the ACL's deny rules alone (acl.conf).",
                "",
            )
        check = (
            "    # Revocation at the handshake: EMQX fetches the CRL from the distribution\n"
            f"    # point every certificate names ({self.crl_url}, `iot-platform crl serve`).\n"
            "    enable_crl_check = true"
        )
        cache = (
            "\n# The fetched CRL is re-fetched this often: a revoked certificate's handshake is\n"
            "# refused at the latest one refresh_interval after the revocation (the ACL's deny\n"
            "# rules cut its open sessions before that).\n"
            "crl_cache {\n"
            f"  refresh_interval = {CRL_REFRESH_INTERVAL}\n"
            f"  http_timeout = {CRL_HTTP_TIMEOUT}\n"
            "}\n"
        )
        return check, cache

    def render(self) -> tuple[str, str]:
        """Return (emqx.conf, acl.conf) text."""
        values = {
            "port": self.port,
            "bind_address": self.bind_address,
            "certs_dir": self.certs_dir,
            "config_dir": self.config_dir,
            "payload_limit": self.payload_limit,
            "max_packet_size": min(self.payload_limit + PACKET_ALLOWANCE, MQTT_MAX_PACKET_BYTES),
            "max_inflight": min(self.max_inflight, EMQX_MAX_INFLIGHT),
            "max_queued": self.max_queued,
        }
        values["crl_check"], values["crl_cache"] = self.crl_blocks()
        acl = render_acl(self.ingest_user, read_denied_identities(self.certs_dir))
        return template("emqx.conf.tmpl").substitute(values), acl

    def write(self) -> Path:
        conf, acl = self.render()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        write_public(self.config_dir / "acl.conf", acl.encode())
        conf_path = self.config_dir / "emqx.conf"
        write_public(conf_path, conf.encode())
        return conf_path
