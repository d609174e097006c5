"""The message builders: each returns a `Message`, the notification text and its blocks."""

from __future__ import annotations

from typing import NamedTuple

from slack_sdk.models.blocks import Block


class Message(NamedTuple):
    """What every builder returns: `text` is the notification (and the fallback where blocks
    cannot show), `blocks` the Block Kit body; unpacks as `text, blocks = ...`."""

    text: str
    blocks: list[Block]
