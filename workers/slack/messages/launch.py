"""Block Kit for launching and autostop: the launch confirmation with its price, the
ready report with [Train on it], and the autostop heads-up."""

from __future__ import annotations

from datetime import datetime

from slack_sdk.models.blocks import ActionsBlock, Block, MarkdownTextObject, SectionBlock

from workers.slack.blocks import button, confirmation
from workers.slack.client import clamp
from workers.slack.ids import ActionId, BlockId
from workers.slack.messages import Message


def confirm_blocks(head: str, lines: list[str], nonce: str, requester_id: str, expires_at: datetime) -> Message:
    buttons = [
        button("Launch", ActionId.LAUNCH_CONFIRM, nonce, "primary"),
        button("Cancel", ActionId.LAUNCH_CANCEL, nonce),
    ]
    blocks = confirmation(head, lines, BlockId.LAUNCH_ACTIONS, buttons, requester_id, expires_at)
    return Message(head.splitlines()[0], blocks)


def train_command(instance_id: str) -> str:
    return f"/runctl train {instance_id} <script.py> --then stop -- <script args>"


def ready_blocks(text: str, instance_id: str) -> Message:
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(text))),
        ActionsBlock(
            block_id=BlockId.LAUNCH_ACTIONS,
            elements=[button("Train on it", ActionId.TRAIN_ON_IT, instance_id, "primary")],
        ),
    ]
    return Message(text.splitlines()[0], blocks)


def headsup_blocks(text: str, instance_id: str) -> Message:
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(text))),
        ActionsBlock(
            block_id=BlockId.AUTOSTOP_ACTIONS,
            elements=[
                button("Keep running 1h", ActionId.AUTOSTOP_KEEP, instance_id, "primary"),
                button("Stop now", ActionId.AUTOSTOP_STOP_NOW, instance_id),
            ],
        ),
    ]
    return Message(text.splitlines()[0], blocks)
