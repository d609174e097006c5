"""`/runctl/events`: a run's wrapper reports its exit (and progress) here, signed with the
run's own key (workers/state/event_keys.py, workers/remote/events.py).

Refused with 401, before anything is written: a missing or malformed signature, a run
with no key, a wrong signature, a timestamp more than five minutes off, a body naming
another run; then a nonce seen before (a replay; nonces are kept an hour, longer than a
timestamp stays fresh). Bodies over MAX_BODY_BYTES get 413, more than RUNCTL_EVENTS_PER_MINUTE
events of one run 429. An accepted event queues one job (workers/jobs/events.py) and is
answered 202; nothing else happens here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from bot import answers, guards
from bot.signing import MAX_SKEW_SECONDS
from workers.errors import RateLimited
from workers.queueing import QUEUE, JobPath
from workers.state import event_keys
from workers.state.runs import RUN_ID

StartResponse = Callable[..., Any]
Reader = Callable[[dict[str, Any], int, float], bytes]
log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024  # an event is a few hundred bytes; the progress file it carries is capped at 4 KiB
BODY_SECONDS = 5.0
KINDS = ("progress", "exit")
_SIGNATURE = re.compile(r"v1=[0-9a-f]{64}")
_NONCE = re.compile(r"[0-9a-f]{16,64}")


def verify(key: str, signature: str, body: bytes) -> bool:
    expected = "v1=" + hmac.new(key.encode(), b"v1:" + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def read_event(body: bytes, run_id: str, now: float) -> dict[str, Any] | None:
    """The signed body as an event of run_id, fresh; None when it is not one."""
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("run_id") != run_id or event.get("kind") not in KINDS:
        return None
    ts, nonce, progress = event.get("ts"), event.get("nonce"), event.get("progress")
    if not isinstance(ts, int) or isinstance(ts, bool) or abs(now - ts) > MAX_SKEW_SECONDS:
        return None
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        return None
    if progress is not None and not isinstance(progress, dict):
        return None
    return event


def handler(redis: Redis, per_minute: int, read: Reader) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    queue = Queue(QUEUE, connection=redis)

    def events(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return answers.plain(start_response, "405 Method Not Allowed", b"POST only\n")
        run_id = environ.get("HTTP_X_RUNCTL_RUN") or ""
        signature = environ.get("HTTP_X_RUNCTL_SIGNATURE") or ""
        if not RUN_ID.fullmatch(run_id) or not _SIGNATURE.fullmatch(signature):
            return _refused(start_response)
        declared = answers.declared_length(environ, MAX_BODY_BYTES, start_response)
        if isinstance(declared, list):
            return declared
        if declared >= 0:  # read no further than declared: a keep-alive connection sends no EOF
            environ = {**environ, "wsgi.input": _Limited(environ.get("wsgi.input"), declared)}
        try:
            body = read(environ, MAX_BODY_BYTES, BODY_SECONDS)
        except TimeoutError:
            return answers.plain(start_response, "408 Request Timeout", b"request body too slow\n")
        except Exception:  # TooLarge (bot.web), or a dropped connection
            return answers.plain(start_response, "413 Content Too Large", b"request body too large\n")
        try:
            key = event_keys.get(redis, run_id)
            if key is None or not verify(key, signature, body):
                return _refused(start_response)
            event = read_event(body, run_id, time.time())
            if event is None:
                return _refused(start_response)
            nonce = f"event:{run_id}:{event['nonce']}"
            if not guards.admit(redis, nonce, f"run:{run_id}", per_minute):
                return _refused(start_response)  # a replay
            # At the front: the worker takes it next, before ticks and commands already queued.
            queue.enqueue(
                JobPath.RUN_EVENT.value, run_id, event["kind"], event.get("progress"),
                job_timeout=120, result_ttl=3600, failure_ttl=7 * 86400, at_front=True,
            )
            event_keys.renew(redis, run_id)
        except RateLimited:
            return answers.plain(start_response, "429 Too Many Requests", b"too many events for this run\n")
        except RedisError as exc:
            log.warning("run event for %s: Redis: %s", run_id, exc)
            return answers.plain(start_response, "503 Service Unavailable", b"queue unreachable\n")
        return answers.plain(start_response, "202 Accepted", b"accepted\n")

    return events


class _Limited:
    """At most `left` bytes of a stream (gunicorn bounds its input itself; other servers may not)."""

    def __init__(self, stream: Any, left: int) -> None:
        self.stream, self.left = stream, left

    def read(self, size: int = -1) -> bytes:
        if self.stream is None or self.left <= 0:
            return b""
        data: bytes = self.stream.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _refused(start_response: StartResponse) -> list[bytes]:
    return answers.plain(start_response, "401 Unauthorized", b"invalid event\n")

