"""`/runctl/events`: a run's wrapper reports its exit (and progress) here, signed with the
run's own key (workers/state/event_keys.py, workers/remote/events.py).

Refused with 401, before anything is written: a missing or malformed signature, a run
with no key, a wrong signature, a timestamp more than five minutes off, a body naming
another run, a run that is not live (ended: its key signs nothing more); then a nonce seen
before (a replay; nonces are kept an hour, longer than a timestamp stays fresh). A signed
body that is not an event (a number that is not finite or is past NUMBER_LIMIT, a field of
the wrong type) gets 400, bodies over MAX_BODY_BYTES 413. Budgets, each a sliding minute,
answered 429: progress events per run (RUNCTL_EVENTS_PER_MINUTE), per instance, per user
and overall (RUNCTL_EVENTS_*_PER_MINUTE); exit events have their own per-run budget, so
progress can never push out a run's end. An accepted event is recorded for the run's one
pending job (workers/state/event_queue.py), queued on `runctl-events` if none is pending,
and answered 202; nothing else happens here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from bot import answers
from bot.signing import MAX_SKEW_SECONDS
from workers.remote.events import loads
from workers.settings import Settings
from workers.state import event_keys, event_queue
from workers.state.event_queue import Offer, Window
from workers.state.runs import RUN_ID, Run, RunStore

StartResponse = Callable[..., Any]
Reader = Callable[[dict[str, Any], int, float], bytes]
log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024  # an event is a few hundred bytes; the progress file it carries is capped at 4 KiB
BODY_SECONDS = 5.0
KINDS = ("progress", "exit")
EXITS_PER_MINUTE = 6  # exit events of one run that queue a job (the wrapper sends one, trying up to three times)
_SIGNATURE = re.compile(r"v1=[0-9a-f]{64}")
_NONCE = re.compile(r"[0-9a-f]{16,64}")


def verify(key: str, signature: str, body: bytes) -> bool:
    expected = "v1=" + hmac.new(key.encode(), b"v1:" + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


class BadEvent(ValueError):
    """Signed with the run's key, but not an event: 400."""


def read_event(body: bytes, run_id: str, now: float) -> dict[str, Any] | None:
    """The signed body as an event of run_id, fresh; None when it is not one (401); BadEvent
    when it is not an event at all (400)."""
    try:
        event = loads(body)
    except ValueError as exc:  # malformed, or a number that is not finite or too large
        raise BadEvent(str(exc)) from None
    if not isinstance(event, dict) or event.get("run_id") != run_id or event.get("kind") not in KINDS:
        return None
    ts, nonce, progress = event.get("ts"), event.get("nonce"), event.get("progress")
    if not isinstance(ts, int) or isinstance(ts, bool) or abs(now - ts) > MAX_SKEW_SECONDS:
        return None
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        return None
    if progress is not None and (not isinstance(progress, dict) or not isinstance(progress.get("metrics", {}), dict)):
        raise BadEvent("progress is not an object of metrics")
    return event


def live_run(redis: Redis, run_id: str) -> Run | None:
    run = RunStore(redis).get(run_id)
    return run if run is not None and not run.state.ended else None


def budgets(settings: Settings, run: Run, kind: str) -> list[Window]:
    rid = run.run_id
    if kind == "exit":
        return [Window(f"runctl:rate:run:{rid}:exit", EXITS_PER_MINUTE, "exit events for this run")]
    return [
        Window(f"runctl:rate:run:{rid}", settings.RUNCTL_EVENTS_PER_MINUTE, "events for this run"),
        Window(
            f"runctl:rate:events:instance:{run.instance_id}",
            settings.RUNCTL_EVENTS_INSTANCE_PER_MINUTE,
            "events from this instance's runs",
        ),
        Window(
            f"runctl:rate:events:user:{run.user_id}",
            settings.RUNCTL_EVENTS_USER_PER_MINUTE,
            "events from this user's runs",
        ),
        Window("runctl:rate:events:total", settings.RUNCTL_EVENTS_TOTAL_PER_MINUTE, "events from all runs"),
    ]


def handler(
    redis: Redis, settings: Settings, read: Reader
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
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
            run = live_run(redis, run_id)
            if run is None:  # ended (a stop flow leaves its key to expire): the key signs nothing more
                return _refused(start_response)
            now = time.time()
            try:
                event = read_event(body, run_id, now)
            except BadEvent as exc:
                log.info("run event for %s: %s", run_id, exc)
                return answers.plain(start_response, "400 Bad Request", b"not a run event\n")
            if event is None:
                return _refused(start_response)
            kind = event["kind"]
            offered = event_queue.offer(
                redis,
                run_id,
                event["nonce"],
                kind == "exit",
                event.get("progress"),
                budgets(settings, run, kind),
                now,
                always_counted=kind != "exit",  # an exit merged into a pending job costs nothing
            )
            if offered is Offer.REPLAY:
                return _refused(start_response)
            if isinstance(offered, Window):
                text = f"too many {offered.name} (at most {offered.limit} a minute)\n"
                return answers.plain(start_response, "429 Too Many Requests", text.encode())
            if offered is Offer.QUEUED:
                event_queue.queue_job(redis, run_id)
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
