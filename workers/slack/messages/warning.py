"""Cost and uptime warnings as Slack messages: several to a post, each with its buttons
while someone must decide."""

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
from workers.slack.messages import Message
from workers.state.warnings import Kind, Status, WarningPost, WarningRecord, button_value

ICON = {
    Kind.UPTIME: ":clock3:",
    Kind.COST: ":moneybag:",
    Kind.IDLE: ":zzz:",
    Kind.CHECKPOINT: ":floppy_disk:",
    Kind.GPU_IDLE: ":turtle:",
}


# Two blocks a warning (its text, its buttons while open): 20 fit Slack's 50 blocks
# with room for the post's own note.
PER_POST = 20


def render_post(post: WarningPost, records: list[WarningRecord]) -> Message:
    """A post listing its warnings, each with its own buttons while someone must decide."""
    blocks: list[Block] = []
    for record in records[:PER_POST]:
        blocks.extend(warning_blocks(record))
    notes = []
    if post.in_thread:
        notes.append(f"{post.in_thread} more in the thread.")
    if post.later:
        notes.append(f"{post.later} more did not fit Slack's posting rate; the next sweep posts them.")
    if notes:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=" ".join(notes))]))
    return Message(_summary(records), blocks)


def warning_blocks(record: WarningRecord) -> list[Block]:
    """One warning: what is wrong and what was decided, and its buttons while it is open."""
    mention = f"<@{record.owner}> " if record.owner else ""
    lines = [f"{ICON[record.kind]} {mention}{record.headline}", record.detail, _outcome(record)]
    text = clamp("\n".join(line for line in lines if line))
    blocks: list[Block] = [SectionBlock(block_id=f"warning:{record.key}", text=MarkdownTextObject(text=text))]
    if record.status is Status.OPEN:
        blocks.append(_buttons(record))
    return blocks


def _summary(records: list[WarningRecord]) -> str:
    """The notification text: each warning's owner and headline, one a line, cut to fit."""
    lines = [f"<@{r.owner}> {r.headline}" if r.owner else r.headline for r in records]
    return clamp("\n".join(lines), 300 if len(records) == 1 else 3000)


def _outcome(record: WarningRecord) -> str:
    mention = f"<@{record.acted_by}>" if record.acted_by else "someone"
    until = f"{record.quiet_until:%Y-%m-%d %H:%M} UTC" if record.quiet_until else ""
    if record.status is Status.SNOOZED:
        return f":mute: Snoozed by {mention} until {until}."
    if record.status is Status.KEPT:
        reason = f": “{escape(record.reason)}”" if record.reason else " (no reason given)"
        return f":white_check_mark: Kept running by {mention}{reason}. Quiet until {until}."
    if record.status is Status.STOPPING:
        return f":octagonal_sign: Stop requested by {mention}; progress in the thread."
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
    # Block ids are unique within a message: one actions block per warning.
    return ActionsBlock(block_id=f"{BlockId.WARNING_ACTIONS}:{record.key}", elements=[stop, snooze, keep])
