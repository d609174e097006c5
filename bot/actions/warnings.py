"""Buttons on cost and uptime warnings: ack at once, check, then queue the work."""

from __future__ import annotations

import json
import logging
from typing import Any

from slack_bolt import Ack, App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import InputBlock, PlainTextInputElement
from slack_sdk.models.views import View

from bot.middleware import Click, front_record
from workers import audit, policy
from workers.commands import Actor
from workers.errors import PermissionDenied
from workers.queueing import JobPath, KeepArgs, WarningArgs, enqueue
from workers.settings import Settings
from workers.slack.client import privately
from workers.slack.ids import ActionId
from workers.state.warnings import Kind, WarningStore, parse_button_value

log = logging.getLogger(__name__)
KEEP_VIEW = "warn_keep_reason"
KEEP_REFUSED = "Only the instance's owner or an admin can keep it running; nothing was changed."
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"


def _clicked(click: Click) -> tuple[str, Kind, str, str] | None:
    """(instance id, kind, user id, channel id) of a button click; None for a value we never rendered."""
    try:
        instance_id, kind = parse_button_value(click.value)
    except ValueError:
        log.warning("ignoring a warning button with value %r", click.value[:100])
        return None
    return instance_id, kind, click.actor.user_id, click.actor.channel_id


def stop_now(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    settings: Settings = context["settings"]
    click: Click = context["click"]
    clicked = _clicked(click)
    if clicked is None:
        return
    instance_id, kind, user, channel = clicked
    record = WarningStore(context["redis"]).get(instance_id, kind)
    try:
        # The middleware checked the tier; only here is the owner known.
        policy.check(settings, user, "stop", record.owner if record else None)
    except PermissionDenied as exc:
        privately(client, channel, user, exc.as_text())
        return
    args = WarningArgs(instance_id=instance_id, kind=kind.value)
    enqueue(context["queue"], JobPath.WARNING_STOP_NOW, args, click.actor, what=click.what)
    privately(
        client,
        channel,
        user,
        f":octagonal_sign: Stopping `{instance_id}`; a live run saves its checkpoint first. "
        "Progress follows in the warning's thread.",
    )


def _by(user: str) -> Actor:
    """Snooze and Keep act as the bare user, as they always have: answered by DM, in no channel."""
    return Actor(user_id=user, channel_id="")


def refusal(context: dict[str, Any], user: str, verb: str, instance_id: str, kind: Kind) -> PermissionDenied | None:
    """Snooze and Keep are the instance owner's or an admin's (the policy's rule for
    button verbs it does not list); a refusal is audited. None: allowed."""
    settings: Settings = context["settings"]
    record = WarningStore(context["redis"]).get(instance_id, kind)
    owner = record.owner if record else None
    if policy.allowed(settings, user, verb, owner_id=owner):
        return None
    try:
        policy.check(settings, user, verb, owner)
    except PermissionDenied as exc:
        entry = audit.Record(
            user=user,
            text=f"{verb} {kind.value} warning",
            decision="refused",
            outcome=f"PermissionDenied: {exc.what}",
            instance=instance_id,
            source="click",
        )
        front_record(settings, context["redis"], entry)
        return exc
    return None  # the policy file changed in between: allowed now


def _admitted(context: dict[str, Any], client: WebClient, verb: str) -> tuple[str, Kind, str, str] | None:
    """The click on a warning's button, if the policy lets its person `verb`; a refusal is told to them."""
    clicked = _clicked(context["click"])
    if clicked is None:
        return None
    instance_id, kind, user, channel = clicked
    refused = refusal(context, user, verb, instance_id, kind)
    if refused is not None:
        privately(client, channel, user, refused.as_text())
        return None
    return clicked


def snooze(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    admitted = _admitted(context, client, "snooze")
    if admitted is None:
        return
    instance_id, kind, user, _ = admitted
    args = WarningArgs(instance_id=instance_id, kind=kind.value)
    enqueue(context["queue"], JobPath.WARNING_SNOOZE, args, _by(user), what=context["click"].what)


def keep(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    admitted = _admitted(context, client, "keep")
    if admitted is None:
        return
    click: Click = context["click"]
    instance_id, kind, user, _ = admitted
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
        client.views_open(trigger_id=click.trigger_id, view=view)
    except SlackApiError:
        # No modal (expired trigger, or a client without views): record the decision without a reason.
        args = KeepArgs(instance_id=instance_id, kind=kind.value, reason="")
        enqueue(context["queue"], JobPath.WARNING_KEEP, args, _by(user), what=click.what)


def keep_reason(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    """The [Keep running] modal's submission: the same owner-or-admin rule as the click
    (the gate has rate-limited and audited it); a refusal is shown in the modal."""
    view = body["view"]
    meta = json.loads(view.get("private_metadata") or "{}")
    user = body["user"]["id"]
    instance_id, kind = str(meta.get("instance_id", "")), Kind(str(meta.get("kind", "")))
    refused = refusal(context, user, "keep", instance_id, kind)
    if refused is not None:
        ack(response_action="errors", errors={REASON_BLOCK: KEEP_REFUSED})
        return
    ack()
    reason = view["state"]["values"][REASON_BLOCK][REASON_INPUT].get("value") or ""
    args = KeepArgs(instance_id=instance_id, kind=kind.value, reason=reason)
    enqueue(context["queue"], JobPath.WARNING_KEEP, args, _by(user), what="your click on [Keep running]")


def register(app: App) -> None:
    app.action(ActionId.WARN_STOP_NOW.value)(stop_now)
    app.action(ActionId.WARN_SNOOZE.value)(snooze)
    app.action(ActionId.WARN_KEEP.value)(keep)
    app.view(KEEP_VIEW)(keep_reason)
