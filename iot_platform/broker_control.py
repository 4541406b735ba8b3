"""The broker's access control, and how a change reaches a running broker.

What each identity may do (the ACL, rendered from the topic families of
``iot_platform.topics``), which identities are revoked (the deny list published next to
the CRL), and the reload that makes Mosquitto re-read both. The embedded stack, docker
compose (``iot-platform broker config``) and revocation (``BrokerControlResource``) all
use this module; ``iot_platform.services.mosquitto`` only runs the process.
"""

from __future__ import annotations

import os
import signal
from importlib import resources
from pathlib import Path
from string import Template

from iot_platform.pki import write_public
from iot_platform.services.process import ServiceError
from iot_platform.topics import device_acl_rules

INGEST_IDENTITY = "ingest"
# Published next to crl.pem by revocation: identities the ACL denies outright. The CRL
# only stops new TLS handshakes; the ACL deny also silences a session that is connected.
DENIED_IDENTITIES_FILE = "denied_identities"


def read_denied_identities(certs_dir: Path) -> list[str]:
    try:
        lines = (certs_dir / DENIED_IDENTITIES_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return sorted({line.strip() for line in lines if line.strip()})


def write_denied_identities(certs_dir: Path, denied: list[str]) -> None:
    text = "".join(f"{identity}\n" for identity in sorted(denied))
    write_public(certs_dir / DENIED_IDENTITIES_FILE, text.encode())


def write_acl(path: Path, ingest_user: str, denied: list[str]) -> None:
    write_public(path, render_acl(ingest_user, denied).encode())


def render_acl(ingest_user: str, denied: list[str]) -> str:
    """The ACL text: the shared template plus one deny-all section per revoked identity."""
    acl = template("acl.tmpl").substitute(ingest_user=ingest_user, device_rules=device_acl_rules())
    denied = [identity for identity in denied if identity != ingest_user]
    if denied:
        acl += "\n# Revoked identities (revoke_certificate): every topic denied, read and write.\n"
        acl += "".join(f"user {identity}\ntopic deny #\n" for identity in denied)
    return acl


def template(name: str) -> Template:
    """A broker configuration template shipped in ``iot_platform/templates/``."""
    return Template(resources.files("iot_platform.templates").joinpath(name).read_text())


def reload_broker(pid_file: Path) -> int:
    """SIGHUP the broker whose ``pid_file`` we wrote; returns the PID signalled.

    This is how a revocation reaches a running broker: Mosquitto re-reads its CRL for
    new connections on SIGHUP.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ServiceError(f"cannot read the broker PID from {pid_file}: {exc}") from None
    try:  # a stale PID file may name a reused PID: SIGHUP would end an unrelated process
        running = Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto"
    except OSError:
        running = False
    if not running:
        raise ServiceError(f"broker PID {pid} from {pid_file} is not a running mosquitto")
    os.kill(pid, signal.SIGHUP)
    return pid
