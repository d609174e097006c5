"""[Full log] on a run's messages: ack, then queue the upload job (its value is the run id); a
run's link buttons: ack only."""

from __future__ import annotations

import re
from typing import Any

from slack_bolt import Ack, App

from bot.middleware import Click
from workers.queueing import JobPath, RunArgs, enqueue
from workers.slack.ids import LINK_ACTION_PREFIX, ActionId


def full_log_click(ack: Ack, context: dict[str, Any]) -> None:
    ack()
    click: Click = context["click"]
    enqueue(context["queue"], JobPath.FULL_LOG, RunArgs(run_id=click.value), click.actor, what=click.what)


def link_click(ack: Ack) -> None:
    """A link button (W&B, MLflow, ...): Slack opened the page; runctl has nothing to do."""
    ack()


def register(app: App) -> None:
    app.action(ActionId.FULL_LOG.value)(full_log_click)
    app.action(re.compile("^" + re.escape(LINK_ACTION_PREFIX)))(link_click)
