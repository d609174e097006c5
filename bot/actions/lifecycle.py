"""Buttons of the lifecycle messages: [Terminate] / [Stop instead] / [Cancel] on a
terminate confirmation, and [Resume training] on a start report.

Each acks first, checks the clicking user (not the requester) where only the
handler can, then queues the work. A button's value is only a nonce or a run id.
"""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot.middleware import Click
from workers import policy
from workers.errors import PermissionDenied
from workers.queueing import ConfirmArgs, JobPath, RunClickArgs, enqueue
from workers.settings import Settings
from workers.slack.client import privately
from workers.slack.ids import ActionId
from workers.state.confirmations import ConfirmStore


def confirmation_click(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    click: Click = context["click"]
    actor = click.actor
    settings: Settings = context["settings"]
    asked = ConfirmStore(context["redis"]).receipt(click.value)
    try:
        policy.check_answer(settings, actor.user_id, asked.requester_id if asked else None)
    except PermissionDenied as exc:
        privately(client, actor.channel_id, actor.user_id, exc.as_text())
        return
    launch = click.action_id in (ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL)
    path = JobPath.LAUNCH_CLICK if launch else JobPath.CONFIRM_CLICK
    args = ConfirmArgs(action=click.action_id, nonce=click.value, message_ts=click.message_ts)
    enqueue(context["queue"], path, args, actor, what=click.what)


def resume_click(ack: Ack, context: dict[str, Any]) -> None:
    ack()
    click: Click = context["click"]
    args = RunClickArgs(run_id=click.value, message_ts=click.message_ts)
    enqueue(context["queue"], JobPath.RESUME, args, click.actor, what=click.what)


def register(app: App) -> None:
    for action in (
        ActionId.TERMINATE_CONFIRM,
        ActionId.TERMINATE_NO_BACKUP,
        ActionId.TERMINATE_STOP_INSTEAD,
        ActionId.TERMINATE_CANCEL,
    ):
        app.action(action.value)(confirmation_click)
    app.action(ActionId.RESUME_TRAINING.value)(resume_click)
