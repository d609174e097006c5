"""A fake instance metadata service (IMDSv2, tokens required) for the sandbox's instances,
with a spot interruption notice a test can raise.

Each instance's metadata lives under `/<instance-id>/`: the sandbox's agent gives that
instance's scripts `AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:<port>/<instance-id>/`,
standing in for the link-local route to 169.254.169.254 that a real instance has.

As the real one (EC2 user guide, "Use the Instance Metadata Service"): a token comes only
from `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` in 1..21600 (else
400), never for a request with `X-Forwarded-For` (403); every GET needs a live token (401
without); `spot/instance-action` is 404 until a notice, then `{"action", "time"}`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


class Imds:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expiry)
        self._notices: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str, str]] = []  # (instance id, method, path)
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                imds._answer(self, "PUT")

            def do_GET(self) -> None:
                imds._answer(self, "GET")

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-imds", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def endpoint(self, instance_id: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/{instance_id}/"

    def raise_notice(self, instance_id: str, action: str = "stop", in_seconds: int = 120) -> dict[str, str]:
        """What EC2 does two minutes before it interrupts a spot instance."""
        when = (datetime.now(UTC) + timedelta(seconds=in_seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        notice = {"action": action, "time": when}
        with self._lock:
            self._notices[instance_id] = notice
        return notice

    def clear_notice(self, instance_id: str) -> None:
        """The instance was restarted: EC2 is no longer about to stop it (the path answers 404 again)."""
        with self._lock:
            self._notices.pop(instance_id, None)

    def asked(self, instance_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(m, p) for iid, m, p in self.requests if iid == instance_id]

    # --- serving ---
    def _answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        instance_id, _, rest = handler.path.lstrip("/").partition("/")
        path = "/" + rest
        with self._lock:
            self.requests.append((instance_id, method, path))
        status, body = self._route(instance_id, method, path, handler)
        data = body.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, instance_id: str, method: str, path: str, handler: BaseHTTPRequestHandler) -> tuple[int, str]:
        headers = handler.headers
        if method == "PUT":
            if path != TOKEN_PATH:
                return 405, "Method Not Allowed"
            if headers.get("X-Forwarded-For"):
                return 403, "Forbidden"
            ttl = headers.get(TTL_HEADER, "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "Bad Request"
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._tokens[token] = (instance_id, time.monotonic() + int(ttl))
            return 200, token
        with self._lock:
            owner, expiry = self._tokens.get(headers.get(TOKEN_HEADER, ""), ("", 0.0))
            notice = self._notices.get(instance_id)
        if owner != instance_id or expiry < time.monotonic():
            return 401, "Unauthorized"
        if path == ACTION_PATH:
            return (200, json.dumps(notice)) if notice else (404, "Not Found")
        return 404, "Not Found"
