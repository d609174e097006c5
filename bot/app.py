"""The Bolt app: one slash command, button actions, and a single error funnel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from slack_bolt import App, BoltContext, BoltRequest, BoltResponse
from slack_bolt.context.respond import Respond
from slack_bolt.middleware import Middleware
from slack_sdk import WebClient

from bot import handlers, signing
from bot.middleware import Reply, front_record, gate_click
from workers import audit
from workers.errors import PermissionDenied, RateLimited, RunctlError
from workers.queueing import QUEUE, RoutedQueue, unreachable
from workers.settings import Settings
from workers.slack import hooks
from workers.slack.client import make_client

log = logging.getLogger(__name__)


class Inject(Middleware):
    """The one global middleware, after Bolt's signature check (from here on the body is
    Slack's): what the listeners need in their context, a foreign response_url dropped, and
    clicks gated (commands pass at once; a command is admitted by its listener,
    bot.handlers.runctl). A class, not a function: Bolt calls it without building keyword
    arguments for it (~15 µs of an ack's CPU, issue 28)."""

    def __init__(self, settings: Settings, redis: Redis, queue: RoutedQueue) -> None:
        self.settings, self.redis, self.queue = settings, redis, queue

    def process(self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]) -> BoltResponse | None:
        context = req.context
        context["settings"] = self.settings
        context["redis"] = self.redis
        context["queue"] = self.queue
        _trust_response_url(self.settings, context, req.body)
        refused = gate_click(context.ack, req.body, req, context.client, context, next)  # type: ignore[arg-type]
        return resp if refused is None else refused


def build_app(
    settings: Settings,
    redis: Redis,
    client: WebClient | None = None,
    token_verification: bool = True,
    socket_mode: bool = False,
    verified: bool = False,
) -> App:
    """The app; `verified`: every request it is given was checked against the signing secret
    already (bot/web.py checks the signature over the bytes it read, before Bolt parses them),
    so Bolt does not check it a second time."""
    client = client or make_client(settings)
    app = App(
        client=client,
        # Socket Mode requests arrive over the app-token websocket and are not signed
        # (Bolt skips verification for them); HTTP mode requires the secret.
        signing_secret="" if socket_mode else settings.secret("SLACK_SIGNING_SECRET"),
        token_verification_enabled=token_verification,
        request_verification_enabled=not verified,
        process_before_response=True,  # listeners only ack and enqueue; a thread hop adds a 10 ms poll
        name="runctl",
    )
    app.use(Inject(settings, redis, RoutedQueue(QUEUE, connection=redis)))  # long jobs go to their own queue
    app.command("/runctl")(handlers.runctl)
    handlers.register_actions(app)

    @app.error
    def funnel(error: Exception, body: dict[str, Any], request: BoltRequest, respond: Respond | None) -> Reply:
        if not _authentic(settings, request):
            # Bolt's verifier raises on a malformed timestamp and lands here: such a request
            # gets a 401 and nothing else (no audit from its body, no respond, no call out).
            log.warning("refused a request that failed verification (%s)", type(error).__name__)
            return BoltResponse(status=401, body={"error": "invalid request"})
        if isinstance(error, RunctlError):
            text = error.as_text()
        elif isinstance(error, RedisError):  # no audit record either: Redis is what failed
            if respond is not None and hooks.trusted(settings, respond.response_url):
                respond(text=unreachable().as_text(), response_type="ephemeral", replace_original=False)
            return None
        else:
            log.exception("unhandled error", exc_info=error)
            text = ":boom: runctl hit an internal error; nothing was queued. The admins can find it in the web log."
        front_record(settings, redis, _failure_record(body, error))
        if respond is not None and hooks.trusted(settings, respond.response_url):
            respond(text=text, response_type="ephemeral", replace_original=False)
        return None

    return app


def _authentic(settings: Settings, request: BoltRequest) -> bool:
    """Over Socket Mode (an authenticated connection), or signed by Slack."""
    if request.mode == "socket_mode":
        return True
    headers = request.headers
    timestamp = next(iter(headers.get("x-slack-request-timestamp", ())), None)
    signature = next(iter(headers.get("x-slack-signature", ())), None)
    secret = settings.secret("SLACK_SIGNING_SECRET")
    return signing.signed(secret, timestamp, signature, request.raw_body.encode())


def _trust_response_url(settings: Settings, context: BoltContext, body: dict[str, Any]) -> None:
    """Drop a response_url that is not Slack's, from the context (so `respond` cannot use
    it) and from the body (so no Actor carries it to a worker)."""
    url = context.response_url
    if url is None or hooks.trusted(settings, url) == url:
        return
    if url:  # an empty one (the console's) is simply none
        log.warning("ignoring a response_url that is not Slack's: %.100r", url)
    context["response_url"] = None
    context.pop("respond", None)
    if "response_url" in body:
        body["response_url"] = None


def _failure_record(body: dict[str, Any], error: Exception) -> audit.Record:
    """An audit record for a request that raised past the middleware (handlers, buttons).
    Built from a body that may be odd (that may be why it raised), so every field is coerced."""
    actions = body.get("actions") or [{}]
    click = body.get("type") in ("block_actions", "view_submission")
    refused = isinstance(error, PermissionDenied | RateLimited)
    what = error.what if isinstance(error, RunctlError) else "internal error"
    if click:
        user, channel = _field(body, "user", "id"), _field(body, "channel", "id")
        text = f"click {_field(actions[0], 'action_id')}"
    else:
        user, channel = _field(body, "user_id"), _field(body, "channel_id")
        text = ("/runctl " + _field(body, "text")).strip()[:500]
    return audit.Record(
        user=user,
        channel=channel,
        text=text,
        decision="refused" if refused else "failed",
        outcome=f"{type(error).__name__}: {what}",
        source="click" if click else "command",
    )


def _field(data: Any, *path: str) -> str:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, str) else ""
