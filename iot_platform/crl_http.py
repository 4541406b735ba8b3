"""The CRL distribution point: ``crl.der`` over HTTP at the path of ``IOT_CRL_URL``.

EMQX checks a client certificate's revocation only through the CRL distribution point the
certificate names (``IOT_CRL_URL``, written by ``pki.CertificateAuthority``); this is what
answers there. Read-only and key-less: it reads ``crl.der`` from the certs directory on
every request — the revoke job and the CRL refresh schedule replace that file atomically
(``pki.write_crl``), so a revocation is served at once, without a restart or a reload.

The encoding follows the URL: RFC 5280 §4.2.1.13 says an HTTP distribution point returns
one DER-encoded CRL (``Content-Type: application/pkix-crl``), which is what any URL gets —
except one whose path ends in ``.pem``, which gets the same CRL in PEM. That exception is
for EMQX: its handshake-time fetch reads DER or PEM, but its periodic cache refresh
(``emqx_crl_cache``, every ``crl_cache.refresh_interval``) decodes PEM only, so a DER body
would leave its cache empty and send every later handshake back here. The deployments
that run EMQX therefore name a ``.pem`` URL.

``/healthz`` answers 200 while the file is there, parses as a CRL and its nextUpdate is in
the future (503 otherwise, with the reason).
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iot_platform.pki import dp_crl_path, utcnow

log = logging.getLogger(__name__)

CRL_CONTENT_TYPE = "application/pkix-crl"
PEM_CONTENT_TYPE = "application/x-pem-file"
DEFAULT_CRL_PORT = 8088


def crl_path_of(url: str) -> str:
    """The HTTP path the distribution point ``url`` names ("/" when it names none)."""
    return urlsplit(url).path or "/"


def listen_port(url: str) -> int:
    """The port the distribution point ``url`` names (80/443 when it names none)."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def crl_status(path: Path) -> dict[str, object]:
    """What /healthz reports: whether the served CRL is there, a CRL, and still current."""
    try:
        crl = x509.load_der_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return {
            "healthy": False,
            "reason": f"{path} does not exist (is IOT_CRL_URL set where "
            "the CRL is signed: pki init, the revoke job, the CRL refresh schedule?)",
        }
    except ValueError:
        return {"healthy": False, "reason": f"{path} is not a DER CRL"}
    next_update = crl.next_update_utc
    healthy = next_update is not None and next_update > utcnow()
    status: dict[str, object] = {
        "healthy": healthy,
        "revoked": len(crl),
        "next_update": next_update.isoformat() if next_update else None,
    }
    if not healthy:
        status["reason"] = "the CRL has expired: run the CRL refresh (pki/crl)"
    return status


def serve_crl(certs_dir: Path, url_path: str, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``certs_dir/crl.der`` at ``url_path`` on a daemon thread; port 0 picks one."""
    crl_file = dp_crl_path(certs_dir)
    pem = url_path.endswith(".pem")

    class Handler(BaseHTTPRequestHandler):
        server_version = "iot-platform-crl"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == url_path:
                try:
                    data = crl_file.read_bytes()  # per request: the newest revocation
                    modified = crl_file.stat().st_mtime
                except FileNotFoundError:
                    log.warning("no %s to serve: is IOT_CRL_URL set where it is signed?", crl_file)
                    self._send(503, b"no CRL yet\n", "text/plain", body=body)
                    return
                content_type = CRL_CONTENT_TYPE
                if pem:
                    try:
                        crl = x509.load_der_x509_crl(data)
                    except ValueError:
                        self._send(503, b"the CRL file is damaged\n", "text/plain", body=body)
                        return
                    data = crl.public_bytes(serialization.Encoding.PEM)
                    content_type = PEM_CONTENT_TYPE
                headers = {
                    "Last-Modified": email.utils.formatdate(modified, usegmt=True),
                    # Relying parties cache by nextUpdate / their own refresh interval; an
                    # intermediary must not serve an older CRL after a revocation.
                    "Cache-Control": "no-cache",
                }
                self._send(200, data, content_type, body=body, headers=headers)
            elif path == "/healthz":
                status = crl_status(crl_file)
                code = 200 if status["healthy"] else 503
                self._send(code, json.dumps(status).encode(), "application/json", body=body)
            else:
                self._send(404, b"not found\n", "text/plain", body=body)

        def _send(
            self,
            code: int,
            data: bytes,
            content_type: str,
            *,
            body: bool,
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *_args: object) -> None:  # fetches and probes: no log line
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="crl-http", daemon=True).start()
    return server
