"""Buttons of launch and autostop messages. [Launch]/[Cancel] are confirmation buttons: terminate's
click handler queues them, on launch's own job path; [Train on it] answers with the command to copy."""

from __future__ import annotations

from typing import Any

from rq import Queue
from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.actions.lifecycle import _message_ts, confirmation_click
from bot.grammar import INSTANCE_RE
from workers.commands import Actor
from workers.queueing import JobPath
from workers.slack.ids import ActionId
from workers.slack.messages.launch import train_command


def train_on_it(ack: Ack, body: dict[str, Any], client: WebClient) -> None:
    ack()
    actor = Actor.from_action(body)
    iid = str(body["actions"][0].get("value", ""))
    if not INSTANCE_RE.match(iid):
        return
    text = f"Copy, fill in and send:\n```{train_command(iid)}```"
    try:
        client.chat_postEphemeral(channel=actor.channel_id, user=actor.user_id, text=text)
    except SlackApiError:
        client.chat_postMessage(channel=actor.user_id, text=text)


def autostop_click(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    ack()
    action = body["actions"][0]
    iid = str(action.get("value", ""))
    if not INSTANCE_RE.match(iid):
        return
    path = JobPath.AUTOSTOP_KEEP if action["action_id"] == ActionId.AUTOSTOP_KEEP else JobPath.AUTOSTOP_STOP_NOW
    queue: Queue = context["queue"]
    queue.enqueue(path.value, iid, Actor.from_action(body).model_dump(mode="json"), _message_ts(body), job_timeout=1800)


def register(app: App) -> None:
    for action in (ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL):
        app.action(action.value)(confirmation_click)
    app.action(ActionId.TRAIN_ON_IT.value)(train_on_it)
    for action in (ActionId.AUTOSTOP_KEEP, ActionId.AUTOSTOP_STOP_NOW):
        app.action(action.value)(autostop_click)
