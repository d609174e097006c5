"""Buttons on cost and uptime warnings: ack at once, check, then queue the work."""

from __future__ import annotations

import json
import logging
from typing import Any

from rq import Queue
from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import InputBlock, PlainTextInputElement
from slack_sdk.models.views import View

from workers import policy
from workers.commands import Requester
from workers.errors import PermissionDenied
from workers.queueing import JobPath
from workers.settings import Settings
from workers.slack.ids import ActionId
from workers.state.warnings import Kind, WarningStore, parse_button_value

log = logging.getLogger(__name__)
KEEP_VIEW = "warn_keep_reason"
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"


def _clicked(body: dict[str, Any]) -> tuple[str, Kind, str, str] | None:
    """(instance id, kind, user id, channel id) of a button click; None for a value we never rendered."""
    value = str((body.get("actions") or [{}])[0].get("value", ""))
    try:
        instance_id, kind = parse_button_value(value)
    except ValueError:
        log.warning("ignoring a warning button with value %r", value[:100])
        return None
    channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id", "")
    return instance_id, kind, (body.get("user") or {}).get("id", ""), channel


def stop_now(ack: Ack, body: dict[str, Any], context: dict[str, Any], client: WebClient) -> None:
    ack()
    settings: Settings = context["settings"]
    clicked = _clicked(body)
    if clicked is None:
        return
    instance_id, kind, user, channel = clicked
    record = WarningStore(context["redis"]).get(instance_id, kind)
    try:
        # The middleware checked the tier; only here is the owner known.
        policy.check(settings, user, "stop", record.owner if record else None)
    except PermissionDenied as exc:
        _tell(client, channel, user, exc.as_text())
        return
    who = Requester(user_id=user, channel_id=channel, request_id=body.get("trigger_id", ""))
    queue: Queue = context["queue"]
    queue.enqueue(
        JobPath.WARNING_STOP_NOW.value, instance_id, kind.value, who.model_dump(mode="json"), job_timeout=3600
    )
    _tell(
        client,
        channel,
        user,
        f":octagonal_sign: Stopping `{instance_id}`; a live run saves its checkpoint first. "
        "Progress follows in the warning's thread.",
    )


def _tell(client: WebClient, channel: str, user: str, text: str) -> None:
    try:
        client.chat_postEphemeral(channel=channel, user=user, text=text)
    except SlackApiError:
        client.chat_postMessage(channel=user, text=text)


def snooze(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    ack()
    clicked = _clicked(body)
    if clicked is None:
        return
    instance_id, kind, user, _ = clicked
    context["queue"].enqueue(JobPath.WARNING_SNOOZE.value, instance_id, kind.value, user)


def keep(ack: Ack, body: dict[str, Any], context: dict[str, Any], client: WebClient) -> None:
    ack()
    clicked = _clicked(body)
    if clicked is None:
        return
    instance_id, kind, user, _ = clicked
    view = View(
        type="modal",
        callback_id=KEEP_VIEW,
        private_metadata=json.dumps({"instance_id": instance_id, "kind": kind.value}),
        title="Keep running",
        submit="Keep running",
        close="Cancel",
        blocks=[
            InputBlock(
                block_id=REASON_BLOCK,
                label=f"Why does {instance_id} need to keep running?",
                element=PlainTextInputElement(action_id=REASON_INPUT, max_length=500),
            )
        ],
    )
    try:
        client.views_open(trigger_id=body["trigger_id"], view=view)
    except SlackApiError:
        # No modal (expired trigger, or a client without views): record the decision without a reason.
        context["queue"].enqueue(JobPath.WARNING_KEEP.value, instance_id, kind.value, user, "")


def keep_reason(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    ack()
    view = body["view"]
    meta = json.loads(view.get("private_metadata") or "{}")
    reason = view["state"]["values"][REASON_BLOCK][REASON_INPUT].get("value") or ""
    context["queue"].enqueue(JobPath.WARNING_KEEP.value, meta["instance_id"], meta["kind"], body["user"]["id"], reason)


def register(app: App) -> None:
    app.action(ActionId.WARN_STOP_NOW.value)(stop_now)
    app.action(ActionId.WARN_SNOOZE.value)(snooze)
    app.action(ActionId.WARN_KEEP.value)(keep)
    app.view(KEEP_VIEW)(keep_reason)
