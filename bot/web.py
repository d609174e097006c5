"""HTTP mode: the Bolt app as a WSGI application for gunicorn, at /slack/events.

    gunicorn 'bot.web:create()' --bind 0.0.0.0:$PORT
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from redis import Redis
from slack_bolt.adapter.wsgi import SlackRequestHandler

from bot.app import build_app
from workers.errors import ConfigError
from workers.settings import Settings, load

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def wsgi(settings: Settings, redis: Redis) -> WSGIApp:
    # Signature verification is always on here: build_app enables it and requires the secret.
    app = build_app(settings, redis)
    handler = SlackRequestHandler(app)

    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/slack/events":
            return handler(environ, start_response)
        if path == "/healthz":
            return _plain(start_response, "200 OK", b"ok\n")
        return _plain(start_response, "404 Not Found", b"not found\n")

    return application


def _plain(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    # A length, so keep-alive clients (load balancers' health checks) need not parse chunked bodies.
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def create() -> WSGIApp:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load("web")
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        raise SystemExit(2) from None
    return wsgi(settings, Redis.from_url(settings.REDIS_URL))
