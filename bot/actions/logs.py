"""[Full log] on a run's messages: ack, then queue the upload job (its value is the run id)."""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, App

from bot.middleware import Click
from workers.queueing import JobPath, RunArgs, enqueue
from workers.slack.ids import ActionId


def full_log_click(ack: Ack, context: dict[str, Any]) -> None:
    ack()
    click: Click = context["click"]
    enqueue(context["queue"], JobPath.FULL_LOG, RunArgs(run_id=click.value), click.actor, what=click.what)


def register(app: App) -> None:
    app.action(ActionId.FULL_LOG.value)(full_log_click)
