"""The front door. Everything here runs before anything is queued.

Slash command (``admit_command``, called by its listener): usage, channel and permission tier; then,
with the audit record and the job in one round trip (``Door``), replays dropped and the rate limit.
Button click or modal submission (global, ``gate_click``): drop replays, rate limit,
permission tier of the clicking user. Every decision is audited (capped per user per
minute, ``front_record``); every refusal is private.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from slack_bolt import Ack, BoltRequest, BoltResponse
from slack_sdk import WebClient

from bot import guards
from bot.grammar import parse
from workers import audit, commands, policy
from workers.commands import Actor
from workers.errors import RateLimited, RunctlError, UsageError
from workers.queueing import unreachable
from workers.settings import Settings
from workers.slack.client import privately
from workers.slack.ids import ActionId

log = logging.getLogger(__name__)
Next = Callable[[], None]
Reply = BoltResponse | None

# The policy action every button needs, checked here before its handler runs; the handler
# (and the worker, again) checks it against the owner of what was clicked, or the requester
# of what it answers. Every ActionId has one (tests/test_policy.py); `/runctl help` says the same.
CLICK_TIERS: dict[ActionId, str] = {
    ActionId.TERMINATE_CONFIRM: "terminate",
    ActionId.TERMINATE_STOP_INSTEAD: "stop",
    ActionId.TERMINATE_CANCEL: "terminate",  # answering a terminate confirmation is a terminate decision
    ActionId.TERMINATE_NO_BACKUP: "terminate",
    ActionId.RESUME_TRAINING: "train",  # and `resume` against the stopped run's owner
    ActionId.WARN_STOP_NOW: "stop",
    ActionId.WARN_SNOOZE: "snooze",
    ActionId.WARN_KEEP: "keep",
    ActionId.LAUNCH_CONFIRM: "launch",
    ActionId.LAUNCH_CANCEL: "launch",
    ActionId.TRAIN_ON_IT: "train",  # it only shows a command to copy
    ActionId.AUTOSTOP_KEEP: "autostop",  # postpones the owner's autostop: the autostop command's right
    ActionId.AUTOSTOP_STOP_NOW: "stop",
    ActionId.FULL_LOG: "logs",
    ActionId.QUEUE_AFTER: "train",  # the requester's own command, queued: checked again as a train
    ActionId.QUEUE_CANCEL: "queue",  # and the queued run's requester or an admin (workers/jobs/queued.py)
}


# A button's label, as the messages render it: what a person is told they clicked.
BUTTONS: dict[ActionId, str] = {
    ActionId.TERMINATE_CONFIRM: "[Terminate]",
    ActionId.TERMINATE_STOP_INSTEAD: "[Stop instead]",
    ActionId.TERMINATE_CANCEL: "[Cancel]",
    ActionId.TERMINATE_NO_BACKUP: "[Terminate without backup]",
    ActionId.RESUME_TRAINING: "[Resume training]",
    ActionId.WARN_STOP_NOW: "[Stop now]",
    ActionId.WARN_SNOOZE: "[Snooze 24h]",
    ActionId.WARN_KEEP: "[Keep running]",
    ActionId.LAUNCH_CONFIRM: "[Launch]",
    ActionId.LAUNCH_CANCEL: "[Cancel]",
    ActionId.TRAIN_ON_IT: "[Train on it]",
    ActionId.AUTOSTOP_KEEP: "[Keep running 1h]",
    ActionId.AUTOSTOP_STOP_NOW: "[Stop now]",
    ActionId.FULL_LOG: "[Full log]",
    ActionId.QUEUE_AFTER: "[Queue after it]",
    ActionId.QUEUE_CANCEL: "[Cancel]",
}


@dataclass(frozen=True)
class Click:
    """A button click, read once from its payload by `gate_click` (the handlers' `context["click"]`)."""

    actor: Actor
    action_id: str
    value: str  # the button's value: only ever a nonce, a run id, an instance id or a warning's key
    message_ts: str  # the message the button is on
    trigger_id: str

    @classmethod
    def of(cls, body: dict[str, Any]) -> Click:
        action = (body.get("actions") or [{}])[0]
        ts = (body.get("container") or {}).get("message_ts") or (body.get("message") or {}).get("ts", "")
        return cls(
            actor=Actor.from_action(body),
            action_id=str(action.get("action_id", "")),
            value=str(action.get("value", "")),
            message_ts=str(ts),
            trigger_id=str(body.get("trigger_id", "")),
        )

    @property
    def what(self) -> str:
        """The click, for "runctl's worker stopped while handling your click on [Terminate]"."""
        return "your click on " + next((label for a, label in BUTTONS.items() if a.value == self.action_id), "a button")


@dataclass(frozen=True)
class Door:
    """A slash command the front door has decided without Redis: its replay and rate check,
    its audit record and (the listener's) job reach Redis in one script, one round trip."""

    key: str  # guards.request_key
    counted: bool  # by the rate limit: not help, not a usage error (issue 17)
    record: audit.Record
    retry: str  # X-Slack-Retry-Num, for the log of a dropped replay

    def through(
        self, ack: Ack, context: dict[str, Any], writes: Pipeline | None = None, lock: str | None = None
    ) -> guards.Passed | None:
        """Admit the request, write its record and `writes` (unless `lock` is held): what
        guards.admit_writing says, or None when the request was answered here (a replay,
        silently; over the rate limit, privately and audited). RedisError passes."""
        settings: Settings = context["settings"]
        redis: Redis = context["redis"]
        text = audit.line(self.record)  # once, for the script and the log line
        record = audit.capped_args(settings.RUNCTL_AUDIT_MAXLEN, self.record, settings.RUNCTL_AUDIT_PER_MINUTE, text)
        try:
            passed = guards.admit_writing(
                redis, self.key, self.record.user, settings.RUNCTL_RATE_PER_MINUTE, self.counted, record, writes, lock
            )
        except RateLimited as exc:  # over the rate limit: that answer wins over any other
            refused = {"decision": "refused", "outcome": f"{type(exc).__name__}: {exc.what}"}
            front_record(settings, redis, self.record.model_copy(update=refused))
            ack(text=exc.as_text(), response_type="ephemeral")
            return None
        if passed is None:
            log.info("dropping repeated delivery %s (retry %s)", self.key, self.retry)
            ack()
            return None
        audit.log_record(text)
        return passed


def admit_command(
    ack: Ack, body: dict[str, Any], request: BoltRequest, context: dict[str, Any]
) -> tuple[commands.AnyCommand, Door] | None:
    """Usage, channel and permission tier decided first (no Redis, but for an owner the
    policy needs); then replays dropped and the rate limit, with the decision audited, in
    one round trip (`Door`). None when the command was answered here (acked); else the
    allowed command and its Door, which the listener passes with the command's job.

    The rate limit counts what may reach AWS: `help` and usage errors are answered
    uncounted (issue 17), so a user learning the grammar is never slowed down; channel and
    policy refusals count."""
    settings: Settings = context["settings"]
    redis: Redis = context["redis"]
    user = body.get("user_id", "")
    usage: UsageError | None = None
    refusal: RunctlError | None = None
    command: commands.AnyCommand | None = None
    needed: list[str] = []
    try:
        command = parse(body.get("text", ""))
        needed = policy.actions(command, settings.RUNCTL_THEN)
        if needed:
            policy.check_channel(settings, body.get("channel_id", ""))
    except UsageError as exc:
        usage = exc
    except RunctlError as exc:
        refusal = exc
    instance = getattr(command, "instance_id", None) or ""
    counted = usage is None and not isinstance(command, commands.HelpCommand)
    retry = request.headers.get("x-slack-retry-num", ["0"])[0]
    try:
        try:
            if usage is None and refusal is None and command is not None:
                # The owner is read (a Redis round trip) only when the policy gives one of the
                # needed actions to the owner role: for the others it cannot change the answer.
                owner = policy.owner_of(redis, command) if needed and policy.needs_owner(settings, needed) else None
                # No run on the instance: only its EC2 tag can tell the owner, and the worker reads it.
                policy.check_command(settings, user, command, owner, defer_owner=owner is None)
        except RunctlError as exc:
            refusal = exc
        key = guards.request_key(body, request.raw_body)
        if usage is not None:
            door = Door(key, counted, _command_record(body, "failed", f"usage error: {usage.what}"), retry)
            if door.through(ack, context) is not None:  # else a replay, answered
                ack(text=usage.as_text(), response_type="ephemeral")
            return None
        if refusal is not None:
            outcome = f"{type(refusal).__name__}: {refusal.what}"
            door = Door(key, counted, _command_record(body, "refused", outcome, instance), retry)
            if door.through(ack, context) is not None:  # else a replay or over the rate limit, answered
                ack(text=refusal.as_text(), response_type="ephemeral")
            return None
    except RedisError:
        # Redis is down or hanging: answer within Slack's 3 s, help without it, and start nothing.
        log.warning("front door: Redis did not answer", exc_info=True)
        ack(text=(usage or unreachable()).as_text(), response_type="ephemeral")
        return None
    assert command is not None  # parsed, since no usage error
    outcome = "queued" if needed else "answered"
    return command, Door(key, counted, _command_record(body, "allowed", outcome, instance), retry)


def gate_click(
    ack: Ack, body: dict[str, Any], request: BoltRequest, client: WebClient, context: dict[str, Any], next: Next
) -> Reply:
    """Global middleware for button clicks (block_actions) and modal submissions
    (view_submission): replay, rate limit, tier, audit. Other requests pass."""
    actions = body.get("actions") or []
    if body.get("type") == "block_actions" and actions:
        action_id = str(actions[0].get("action_id", ""))
        label, key = f"click {action_id}", guards.request_key(body, "")
        tier: str | None = {a.value: t for a, t in CLICK_TIERS.items()}.get(action_id)  # None: no such button
    elif body.get("type") == "view_submission":
        # The handler alone knows what the modal is about, so it makes the policy check.
        view = body.get("view") or {}
        label, tier, key = f"submit {view.get('callback_id', '')}", None, guards.request_key(body, request.raw_body)
    else:
        next()
        return None
    settings: Settings = context["settings"]
    redis: Redis = context["redis"]
    user = (body.get("user") or {}).get("id", "")
    channel = (body.get("channel") or {}).get("id", "") or (body.get("container") or {}).get("channel_id", "")
    entry = audit.Record(user=user, channel=channel, text=label, decision="allowed", source="click")
    try:
        if not guards.admit(redis, key, user, settings.RUNCTL_RATE_PER_MINUTE):
            return ack()
        if tier is not None:
            policy.check(settings, user, tier, defer_owner=True)  # the handler knows what was clicked
    except RedisError:
        log.warning("front door: Redis did not answer a click", exc_info=True)
        privately(client, channel, user, unreachable().as_text())
        return ack()
    except RunctlError as exc:
        privately(client, channel, user, exc.as_text())
        refused = entry.model_copy(update={"decision": "refused", "outcome": f"{type(exc).__name__}: {exc.what}"})
        front_record(settings, redis, refused)
        return ack()
    front_record(settings, redis, entry.model_copy(update={"outcome": "passed to the handler"}))
    if body.get("type") == "block_actions":
        context["click"] = Click.of(body)
    next()
    return None


def _command_record(body: dict[str, Any], decision: audit.Decision, outcome: str, instance: str = "") -> audit.Record:
    return audit.Record(
        user=body.get("user_id", ""),
        channel=body.get("channel_id", ""),
        text=("/runctl " + body.get("text", "")).strip()[:500],
        decision=decision,
        outcome=outcome,
        instance=instance,
    )


def front_record(settings: Settings, redis: Redis, entry: audit.Record) -> None:
    """Every audit record the front door writes: capped per user per minute."""
    audit.record(redis, settings.RUNCTL_AUDIT_MAXLEN, entry, settings.RUNCTL_AUDIT_PER_MINUTE)
