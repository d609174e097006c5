"""Block Kit for launching and autostop: the launch confirmation with its price, the
ready report with [Train on it], and the autostop heads-up."""

from __future__ import annotations

from datetime import datetime

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from workers.slack.client import clamp
from workers.slack.ids import ActionId, BlockId


def _expiry(at: datetime) -> str:
    return f"<!date^{int(at.timestamp())}^{{time}}|{at:%H:%M} UTC>"


def confirm_blocks(head: str, lines: list[str], nonce: str, requester_id: str,
                   expires_at: datetime) -> tuple[str, list[Block]]:
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(head))),
        SectionBlock(text=MarkdownTextObject(text=clamp("\n".join(lines)))),
        ActionsBlock(
            block_id=BlockId.LAUNCH_ACTIONS,
            elements=[
                ButtonElement(text=PlainTextObject(text="Launch"), action_id=ActionId.LAUNCH_CONFIRM,
                              value=nonce, style="primary"),
                ButtonElement(text=PlainTextObject(text="Cancel"), action_id=ActionId.LAUNCH_CANCEL, value=nonce),
            ],
        ),
        ContextBlock(elements=[MarkdownTextObject(
            text=f"Only <@{requester_id}> or an admin can click. Expires at {_expiry(expires_at)} (10 minutes).")]),
    ]
    return head.splitlines()[0], blocks


def train_command(instance_id: str) -> str:
    return f"/runctl train {instance_id} <script.py> --then stop -- <script args>"


def ready_blocks(text: str, instance_id: str) -> tuple[str, list[Block]]:
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(text))),
        ActionsBlock(
            block_id=BlockId.LAUNCH_ACTIONS,
            elements=[ButtonElement(text=PlainTextObject(text="Train on it"), action_id=ActionId.TRAIN_ON_IT,
                                    value=instance_id, style="primary")],
        ),
    ]
    return text.splitlines()[0], blocks


def headsup_blocks(text: str, instance_id: str) -> tuple[str, list[Block]]:
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(text))),
        ActionsBlock(
            block_id=BlockId.AUTOSTOP_ACTIONS,
            elements=[
                ButtonElement(text=PlainTextObject(text="Keep running 1h"), action_id=ActionId.AUTOSTOP_KEEP,
                              value=instance_id, style="primary"),
                ButtonElement(text=PlainTextObject(text="Stop now"), action_id=ActionId.AUTOSTOP_STOP_NOW,
                              value=instance_id),
            ],
        ),
    ]
    return text.splitlines()[0], blocks
