"""Small synchronous helpers over paho for tests: connect, publish, collect."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from iot_platform.mqtt_tls import tls_client


@dataclass
class Session:
    """A connected (or refused) client and what it observed."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    suback_codes: list[int] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)
    puback_codes: dict[int, int] = field(default_factory=dict)  # mid -> v5 reason code
    disconnect_reason: str = ""

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)


def open_session(
    host: str,
    port: int,
    *,
    client_id: str,
    ca_file: Path,
    cert_file: Path | None,
    key_file: Path | None,
    timeout: float = 10.0,
    max_inflight: int = 20,
) -> Session:
    """Connect and wait until CONNACK or a refusal (paho only reports refusal as a disconnect)."""
    client = tls_client(client_id, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    client.max_inflight_messages_set(max_inflight)  # paho allows this only before connecting
    session = Session(client)

    def on_connect(_c, _u, _flags, reason_code, _props) -> None:
        session.reason = str(reason_code)
        if not reason_code.is_failure:
            session.connected.set()
        else:
            session.disconnected.set()

    def on_disconnect(_c, _u, _flags, reason_code, _props) -> None:
        session.reason = session.reason or str(reason_code)
        session.disconnect_reason = str(reason_code)
        session.disconnected.set()

    def on_message(_c, _u, message: mqtt.MQTTMessage) -> None:
        session.messages.append(message)

    def on_subscribe(_c, _u, _mid, reason_codes, _props) -> None:
        session.suback_codes.extend(rc.value for rc in reason_codes)
        session.subscribed.set()

    def on_publish(_c, _u, mid, reason_code, _props) -> None:
        session.puback_codes[mid] = reason_code.value

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:  # TLS handshake refused before CONNECT
        session.reason = f"{type(exc).__name__}: {exc}"
        session.disconnected.set()
        return session
    client.loop_start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if session.connected.is_set() or session.disconnected.is_set():
            break
        time.sleep(0.02)
    if not session.connected.is_set():
        client.loop_stop()
    return session


def device_session(
    broker, device_id: str, *, client_id: str | None = None, max_inflight: int = 20
) -> Session:
    cert, key = broker.ca.device_paths(device_id)
    return open_session(
        broker.host,
        broker.port,
        client_id=client_id or device_id,
        ca_file=broker.ca.ca_cert_path,
        cert_file=cert,
        key_file=key,
        max_inflight=max_inflight,
    )


def ingest_session(broker, *, client_id: str = "ingest-test") -> Session:
    cert, key = broker.ca.service_paths("ingest")
    return open_session(
        broker.host,
        broker.port,
        client_id=client_id,
        ca_file=broker.ca.ca_cert_path,
        cert_file=cert,
        key_file=key,
    )
