"""The Bolt app: one slash command, button actions, and a single error funnel."""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis
from rq import Queue
from slack_bolt import Ack, App
from slack_bolt.context.respond import Respond
from slack_sdk import WebClient

from bot import handlers
from bot.middleware import admit_command, gate_click
from workers import audit
from workers.errors import PermissionDenied, RateLimited, RunctlError
from workers.queueing import QUEUE
from workers.settings import Settings
from workers.slack.client import make_client

log = logging.getLogger(__name__)


def build_app(
    settings: Settings,
    redis: Redis,
    client: WebClient | None = None,
    token_verification: bool = True,
) -> App:
    client = client or make_client(settings)
    app = App(
        client=client,
        signing_secret=settings.secret("SLACK_SIGNING_SECRET"),
        token_verification_enabled=token_verification,
        request_verification_enabled=True,
        process_before_response=True,  # listeners only ack and enqueue; a thread hop adds a 10 ms poll
        name="runctl",
    )
    queue = Queue(QUEUE, connection=redis)

    @app.middleware
    def inject(context: dict[str, Any], next: Any) -> None:
        context["settings"] = settings
        context["redis"] = redis
        context["queue"] = queue
        next()

    app.middleware(gate_click)
    app.command("/runctl", middleware=[admit_command])(handlers.runctl)
    handlers.register_actions(app)

    @app.error
    def funnel(error: Exception, body: dict[str, Any], respond: Respond | None, ack: Ack | None) -> None:
        if isinstance(error, RunctlError):
            text = error.as_text()
        else:
            log.exception("unhandled error", exc_info=error)
            text = ":boom: runctl hit an internal error; nothing was queued. The admins can find it in the web log."
        audit.record(redis, settings.RUNCTL_AUDIT_MAXLEN, _failure_record(body, error))
        if respond is not None and body.get("response_url"):
            respond(text=text, response_type="ephemeral", replace_original=False)

    return app


def _failure_record(body: dict[str, Any], error: Exception) -> audit.Record:
    """An audit record for a request that raised past the middleware (handlers, buttons)."""
    actions = body.get("actions") or [{}]
    click = body.get("type") == "block_actions"
    refused = isinstance(error, PermissionDenied | RateLimited)
    what = error.what if isinstance(error, RunctlError) else "internal error"
    return audit.Record(
        user=(body.get("user") or {}).get("id", "") if click else body.get("user_id", ""),
        channel=(body.get("channel") or {}).get("id", "") if click else body.get("channel_id", ""),
        text=f"click {actions[0].get('action_id', '')}" if click else ("/runctl " + body.get("text", "")).strip()[:500],
        decision="refused" if refused else "failed",
        outcome=f"{type(error).__name__}: {what}",
        source="click" if click else "command",
    )
