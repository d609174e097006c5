"""The web process for tests and benchmarks: the real WSGI app (bot/web.py) served on a
local port, so sandbox instances (local shells) reach `/runctl/events` as real ones reach
the bot's public host. `blocked_url` is an address that refuses connections: an instance
with no route to the bot."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WebServer:
    def __init__(self, app: WSGIApp) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="web", daemon=True)
        # A bound socket that never listens: connecting to it is refused, and no one else takes the port.
        self._closed = socket.socket()
        self._closed.bind(("127.0.0.1", 0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def events_url(self) -> str:
        return self.url + "/runctl/events"

    @property
    def blocked_url(self) -> str:
        return f"http://127.0.0.1:{self._closed.getsockname()[1]}/runctl/events"

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._closed.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
