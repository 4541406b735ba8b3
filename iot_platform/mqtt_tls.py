"""paho-mqtt clients over mutual TLS, shared by the ingest daemon, the simulator and tests."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt


def tls_client(
    client_id: str,
    *,
    ca_file: Path,
    cert_file: Path | None,
    key_file: Path | None,
    **kwargs: Any,  # passed through to paho's Client (e.g. transport)
) -> mqtt.Client:
    """An MQTT v5 client that verifies the broker against the platform CA and presents
    its own certificate (mutual TLS). ``cert_file=None`` makes a client without one."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs
    )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    client.tls_set_context(context)
    return client
