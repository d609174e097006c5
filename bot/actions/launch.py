"""Buttons of launch and autostop messages. [Launch]/[Cancel] are confirmation buttons: terminate's
click handler queues them, on launch's own job path; [Train on it] answers with the command to copy."""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot.actions.lifecycle import confirmation_click
from bot.middleware import Click
from workers.commands import INSTANCE_ID
from workers.queueing import InstanceClickArgs, JobPath, enqueue
from workers.slack.client import privately
from workers.slack.ids import ActionId
from workers.slack.messages.launch import train_command


def train_on_it(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    click: Click = context["click"]
    if not INSTANCE_ID.fullmatch(click.value):
        return
    text = f"Copy, fill in and send:\n```{train_command(click.value)}```"
    privately(client, click.actor.channel_id, click.actor.user_id, text)


def autostop_click(ack: Ack, context: dict[str, Any]) -> None:
    ack()
    click: Click = context["click"]
    if not INSTANCE_ID.fullmatch(click.value):
        return
    path = JobPath.AUTOSTOP_KEEP if click.action_id == ActionId.AUTOSTOP_KEEP else JobPath.AUTOSTOP_STOP_NOW
    args = InstanceClickArgs(instance_id=click.value, message_ts=click.message_ts)
    enqueue(context["queue"], path, args, click.actor, what=click.what)


def register(app: App) -> None:
    for action in (ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL):
        app.action(action.value)(confirmation_click)
    app.action(ActionId.TRAIN_ON_IT.value)(train_on_it)
    for action in (ActionId.AUTOSTOP_KEEP, ActionId.AUTOSTOP_STOP_NOW):
        app.action(action.value)(autostop_click)
