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
from bot.middleware import parse_command
from workers.context import QUEUE
from workers.errors import RunctlError
from workers.notifier import make_client
from workers.settings import Settings

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
        signing_secret=settings.secret("SLACK_SIGNING_SECRET") if settings.SLACK_SIGNING_SECRET else None,
        token_verification_enabled=token_verification,
        request_verification_enabled=True,
        process_before_response=False,
        name="runctl",
    )
    queue = Queue(QUEUE, connection=redis)

    @app.middleware
    def inject(context: dict[str, Any], next: Any) -> None:
        context["settings"] = settings
        context["redis"] = redis
        context["queue"] = queue
        next()

    app.command("/runctl", middleware=[parse_command])(handlers.runctl)
    handlers.register_actions(app)

    @app.error
    def funnel(error: Exception, body: dict[str, Any], respond: Respond | None, ack: Ack | None) -> None:
        if isinstance(error, RunctlError):
            text = error.as_text()
        else:
            log.exception("unhandled error", exc_info=error)
            text = ":boom: runctl hit an internal error; nothing was queued. The admins can find it in the web log."
        if respond is not None and body.get("response_url"):
            respond(text=text, response_type="ephemeral", replace_original=False)

    return app
