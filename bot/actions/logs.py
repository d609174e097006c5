"""[Full log] on a run's messages: ack, then queue the upload job (its value is the run id)."""

from __future__ import annotations

from typing import Any

from rq import Queue
from slack_bolt import Ack, App

from workers.commands import Actor
from workers.queueing import JobPath
from workers.slack.ids import ActionId


def full_log_click(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    ack()
    run_id = str(body["actions"][0].get("value", ""))
    queue: Queue = context["queue"]
    actor = Actor.from_action(body)
    queue.enqueue(JobPath.FULL_LOG.value, run_id, actor.model_dump(mode="json"), job_timeout=3600)


def register(app: App) -> None:
    app.action(ActionId.FULL_LOG.value)(full_log_click)
