"""A cost or uptime warning as a Slack message, with its buttons while someone must decide."""

from __future__ import annotations

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from workers.slack.client import clamp
from workers.slack.escape import escape
from workers.slack.ids import ActionId, BlockId
from workers.state.warnings import Kind, Status, WarningRecord, button_value

ICON = {
    Kind.UPTIME: ":clock3:",
    Kind.COST: ":moneybag:",
    Kind.IDLE: ":zzz:",
    Kind.CHECKPOINT: ":floppy_disk:",
    Kind.GPU_IDLE: ":turtle:",
}


def render(record: WarningRecord) -> tuple[str, list[Block]]:
    """The warning message; buttons only while someone still needs to decide."""
    mention = f"<@{record.owner}> " if record.owner else ""
    head = f"{ICON[record.kind]} {mention}{record.headline}"
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(head)))]
    if record.detail:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(record.detail))]))
    outcome = _outcome(record)
    if outcome:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(outcome))]))
    if record.status is Status.OPEN:
        blocks.append(_buttons(record))
    return clamp(f"{mention}{record.headline}", 300), blocks


def _outcome(record: WarningRecord) -> str:
    who = f"<@{record.acted_by}>" if record.acted_by else "someone"
    until = f"{record.quiet_until:%Y-%m-%d %H:%M} UTC" if record.quiet_until else ""
    if record.status is Status.SNOOZED:
        return f":mute: Snoozed by {who} until {until}."
    if record.status is Status.KEPT:
        reason = f": “{escape(record.reason)}”" if record.reason else " (no reason given)"
        return f":white_check_mark: Kept running by {who}{reason}. Quiet until {until}."
    if record.status is Status.STOPPING:
        return f":octagonal_sign: Stop requested by {who}; progress in the thread."
    if record.status is Status.RESOLVED:
        return ":heavy_check_mark: Resolved" + (f" ({escape(record.reason)})." if record.reason else ".")
    return ""


def _buttons(record: WarningRecord) -> ActionsBlock:
    value = button_value(record.instance_id, record.kind)
    stop = ButtonElement(
        text="Stop now",
        action_id=ActionId.WARN_STOP_NOW,
        value=value,
        style="danger",
        confirm=ConfirmObject(
            title="Stop the instance?",
            text=f"Stop {record.label}? A live run saves a checkpoint first.",
            confirm="Stop it",
            deny="Cancel",
        ),
    )
    snooze = ButtonElement(text="Snooze 24h", action_id=ActionId.WARN_SNOOZE, value=value)
    keep = ButtonElement(text="Keep running", action_id=ActionId.WARN_KEEP, value=value)
    return ActionsBlock(block_id=BlockId.WARNING_ACTIONS, elements=[stop, snooze, keep])
