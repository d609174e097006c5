"""The bare Bolt app `bench/ack_latency.py --bare` serves: the floor our `web` process is
compared with. Bolt's own signature check, one `/runctl` listener that enqueues one RQ job
and acks, and nothing else (no front door, guards, grammar, policy or audit).

    gunicorn -c gunicorn.conf.py 'bench.bare_app:create()' ...   (the Procfile's flags otherwise)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from redis import Redis
from rq import Queue
from slack_bolt import Ack, App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
QUEUE = "runctl-bench-bare"  # not a queue any worker serves: the bench only counts the jobs


def _job(text: str) -> None:  # pragma: no cover - never run: nobody serves the queue
    """What the bare app's jobs would run."""


def create() -> WSGIApp:
    redis = Redis.from_url(os.environ["REDIS_URL"])
    queue = Queue(QUEUE, connection=redis)
    app = App(
        client=WebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["SLACK_API_URL"]),
        signing_secret=os.environ["SLACK_SIGNING_SECRET"],
        process_before_response=True,  # as bot/app.py: no thread hop to ack
        name="bare",
    )

    @app.command("/runctl")
    def runctl(ack: Ack, body: dict[str, Any]) -> None:
        queue.enqueue(_job, body.get("text", ""))
        ack()

    handler = SlackRequestHandler(app)

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        return handler(environ, start_response)

    return application
