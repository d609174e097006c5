"""Block Kit pieces that fit Slack's limits (3000 chars per text): long listings as sections,
buttons, and the layout of a confirmation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from workers.slack.client import MAX_TEXT, clamp


def sections(lines: Iterable[str], max_blocks: int, limit: int = MAX_TEXT) -> list[SectionBlock]:
    """Pack lines into as few sections as fit; whatever does not fit in max_blocks is cut
    with a note, never sent over the limit."""
    chunks: list[str] = []
    current = ""
    for line in lines:
        line = clamp(line, limit)
        if current and len(current) + 1 + len(line) > limit:
            chunks.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        chunks.append(current)
    if len(chunks) > max_blocks:
        chunks = chunks[:max_blocks]
        chunks[-1] = clamp(chunks[-1] + "\n…", limit)
    return [SectionBlock(text=MarkdownTextObject(text=chunk)) for chunk in chunks]


def expiry(at: datetime) -> str:
    """A time every reader sees in their own timezone (UTC as the fallback text)."""
    return f"<!date^{int(at.timestamp())}^{{time}}|{at:%H:%M} UTC>"


def button(
    text: str, action_id: str, value: str, style: str | None = None, confirm: ConfirmObject | None = None
) -> ButtonElement:
    return ButtonElement(
        text=PlainTextObject(text=text), action_id=action_id, value=value, style=style, confirm=confirm
    )


def confirmation(
    head: str,
    lines: Sequence[str],
    block_id: str,
    buttons: Sequence[ButtonElement],
    requester_id: str,
    expires_at: datetime,
) -> list[Block]:
    """A request that waits for a click: what is asked, what it means, the buttons, who may click until when."""
    return [
        SectionBlock(text=MarkdownTextObject(text=clamp(head))),
        SectionBlock(text=MarkdownTextObject(text=clamp("\n".join(lines)))),
        ActionsBlock(block_id=block_id, elements=list(buttons)),
        ContextBlock(
            elements=[
                MarkdownTextObject(
                    text=f"Only <@{requester_id}> or an admin can click. Expires at {expiry(expires_at)} (10 minutes)."
                )
            ]
        ),
    ]
