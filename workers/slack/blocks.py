"""Long listings as Block Kit sections that fit Slack's limits (3000 chars per text)."""

from __future__ import annotations

from collections.abc import Iterable

from slack_sdk.models.blocks import MarkdownTextObject, SectionBlock

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
