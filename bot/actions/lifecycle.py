"""Buttons of the lifecycle messages: [Terminate] / [Stop instead] / [Cancel] on a
terminate confirmation, and [Resume training] on a start report.

Each acks first, checks the clicking user (not the requester) where only the
handler can, then queues the work. A button's value is only a nonce or a run id.
"""

from __future__ import annotations

from typing import Any

from rq import Queue
from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from workers import policy
from workers.commands import Actor
from workers.errors import PermissionDenied
from workers.queueing import JobPath
from workers.settings import Settings
from workers.slack.ids import ActionId
from workers.state.confirmations import ConfirmStore


def _message_ts(body: dict[str, Any]) -> str:
    return str((body.get("container") or {}).get("message_ts") or (body.get("message") or {}).get("ts", ""))


def confirmation_click(ack: Ack, body: dict[str, Any], context: dict[str, Any], client: WebClient) -> None:
    ack()
    action = body["actions"][0]
    nonce = str(action.get("value", ""))
    actor = Actor.from_action(body)
    settings: Settings = context["settings"]
    asked = ConfirmStore(context["redis"]).receipt(nonce)
    try:
        policy.check_answer(settings, actor.user_id, asked.requester_id if asked else None)
    except PermissionDenied as exc:
        try:
            client.chat_postEphemeral(channel=actor.channel_id, user=actor.user_id, text=exc.as_text())
        except SlackApiError:
            client.chat_postMessage(channel=actor.user_id, text=exc.as_text())
        return
    launch = action["action_id"] in (ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL)
    path = JobPath.LAUNCH_CLICK if launch else JobPath.CONFIRM_CLICK
    queue: Queue = context["queue"]
    queue.enqueue(
        path.value,
        str(action["action_id"]),
        nonce,
        actor.model_dump(mode="json"),
        _message_ts(body),
        job_timeout=3600,
    )


def resume_click(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    ack()
    run_id = str(body["actions"][0].get("value", ""))
    queue: Queue = context["queue"]
    queue.enqueue(JobPath.RESUME.value, run_id, Actor.from_action(body).model_dump(mode="json"), _message_ts(body))


def register(app: App) -> None:
    for action in (
        ActionId.TERMINATE_CONFIRM, ActionId.TERMINATE_NO_BACKUP, ActionId.TERMINATE_STOP_INSTEAD,
        ActionId.TERMINATE_CANCEL,
    ):
        app.action(action.value)(confirmation_click)
    app.action(ActionId.RESUME_TRAINING.value)(resume_click)
