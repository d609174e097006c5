"""HTTP mode: the Bolt app as a WSGI application for gunicorn, at /slack/events.

    gunicorn -c gunicorn.conf.py 'bot.web:create()' --bind 0.0.0.0:$PORT

Before Bolt sees a request, the front door here refuses, without reading or parsing
the body: headers that cannot be a fresh Slack signature (401) and a declared length
over MAX_BODY_BYTES (413). It then reads at most MAX_BODY_BYTES (chunked bodies too),
within BODY_SECONDS (a watchdog ends slower reads), and checks the signature over those bytes (401). Only a signed
body is handed to Bolt, which parses it (`build_app(verified=True)`: Bolt does not check the signature a second time).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from redis import Redis
from slack_bolt.adapter.wsgi import SlackRequestHandler

from bot import answers, signing
from bot import events as run_events
from bot.app import build_app
from workers.errors import ConfigError
from workers.queueing import connect_front
from workers.settings import Settings, load

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
log = logging.getLogger(__name__)

# Slack's payloads are small: a click carries its message (50 blocks of 3,000 chars at
# most, url-encoded JSON), a modal its view. 512 KiB leaves room and bounds the memory
# and HMAC work an unsigned client can cause per request.
MAX_BODY_BYTES = 512 * 1024
BODY_SECONDS = 10.0  # a client trickling its body holds a thread at most this long
_CHUNK = 64 * 1024


class TooLarge(Exception):
    pass


def wsgi(settings: Settings, redis: Redis) -> WSGIApp:
    # Every request reaches Bolt only once `events` checked its signature (build_app requires the secret).
    app = build_app(settings, redis, verified=True)
    handler = SlackRequestHandler(app)
    secret = settings.secret("SLACK_SIGNING_SECRET")
    run_event = run_events.handler(redis, settings, read_capped)

    def events(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return answers.plain(start_response, "405 Method Not Allowed", b"POST only\n")
        timestamp = environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP")
        signature = environ.get("HTTP_X_SLACK_SIGNATURE")
        if not signing.plausible(timestamp, signature):
            return answers.plain(start_response, "401 Unauthorized", b"invalid request\n")
        declared = answers.declared_length(environ, MAX_BODY_BYTES, start_response)
        if isinstance(declared, list):
            return declared
        try:
            body = read_capped(environ, MAX_BODY_BYTES)
        except TooLarge:
            return answers.plain(start_response, "413 Content Too Large", b"request body too large\n")
        except TimeoutError:
            return answers.plain(start_response, "408 Request Timeout", b"request body too slow\n")
        if not signing.signed(secret, timestamp, signature, body):
            return answers.plain(start_response, "401 Unauthorized", b"invalid request\n")
        signed = {**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}
        return handler(signed, start_response)

    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/slack/events":
            return events(environ, start_response)
        if path == "/runctl/events":  # runs' wrappers, signed with per-run keys (bot/events.py)
            return run_event(environ, start_response)
        if path == "/healthz":
            return answers.plain(start_response, "200 OK", b"ok\n")
        return answers.plain(start_response, "404 Not Found", b"not found\n")

    return application


def read_capped(environ: dict[str, Any], limit: int, seconds: float = BODY_SECONDS) -> bytes:
    """The request body, read in chunks: TooLarge past `limit` bytes, TimeoutError when it
    is not all there within `seconds` (a client that stalls or trickles: when gunicorn
    exposes the socket, the watchdog shuts its read side at the deadline)."""
    stream: BinaryIO | None = environ.get("wsgi.input")
    if stream is None:
        return b""
    sock: socket.socket | None = environ.get("gunicorn.socket")
    deadline = time.monotonic() + seconds
    token = _WATCHDOG.arm(sock, deadline) if sock is not None else None
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                chunk = stream.read(min(_CHUNK, limit + 1 - size))
            except Exception as exc:  # gunicorn's NoMoreData, socket errors: the read side was shut
                if time.monotonic() >= deadline:
                    raise TimeoutError from exc
                raise
            if time.monotonic() >= deadline:
                raise TimeoutError
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise TooLarge
            parts.append(chunk)
    finally:
        if token is not None:
            _WATCHDOG.disarm(token)


class Watchdog:
    """One thread that shuts the read side of sockets whose body is overdue, which wakes
    a worker thread blocked reading it (per-read socket timeouts do not stop a trickle)."""

    TICK = 1.0  # seconds between the thread's looks when nothing is due sooner

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._wake = threading.Condition()
        self._next = 0
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the thread looks next (0: not waiting); arm wakes it only if sooner

    def arm(self, sock: socket.socket, deadline: float) -> int:
        with self._wake:
            self._next += 1
            self._due[self._next] = (deadline, sock)
            if self._thread is None:  # started in the worker process, after gunicorn forks
                self._thread = threading.Thread(target=self._run, name="body-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:
                # Only a deadline sooner than the thread's next look (at most TICK away) wakes
                # it: a notify per request, and the thread switch it causes, was ~15 % of the
                # ack's CPU (issue 28).
                self._wake.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._wake:
            self._due.pop(token, None)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                for token, (deadline, sock) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[token]
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RD)
                # At least once a second, so that a deadline armed later (BODY_SECONDS away)
                # never needs a notify: a request then costs the thread nothing.
                soonest = min((d for d, _ in self._due.values()), default=now + self.TICK)
                self._wakes_at = max(now + 0.01, min(soonest, now + self.TICK))
                self._wake.wait(self._wakes_at - now)
                self._wakes_at = 0.0


_WATCHDOG = Watchdog()


def create() -> WSGIApp:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load("web")
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        raise SystemExit(2) from None
    application = wsgi(settings, connect_front(settings.REDIS_URL))
    # What start-up made (modules, the app, its models) lives as long as the process: out of
    # the collector's scans, which otherwise walk it all again each full collection (~190,000 objects).
    gc.freeze()
    return application
