"""Block Kit for the lifecycle commands: the terminate confirmation, its closed
form, the stop summary and the start report with [Resume training]."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from workers.aws.instance import Instance
from workers.remote.backup import SINGLE_PUT_LIMIT
from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint
from workers.slack.blocks import button, confirmation
from workers.slack.client import clamp
from workers.slack.escape import code
from workers.slack.format import duration, size
from workers.slack.ids import ActionId, BlockId
from workers.slack.messages import Message
from workers.state.runs import Run

MAX_SECTIONS = 45  # Slack allows 50 blocks; keep room for the header and actions


@dataclass(frozen=True)
class Cost:
    """An instance's running time and what it cost, as shown to users."""

    seconds: float | None  # None: not known (never seen running)
    amount: str  # "$1.23", "<$0.01" or "price unknown"
    rate: str  # "$1.006/h" or "price unknown"

    def text(self, label: str) -> str:
        if self.seconds is None:
            return f"{label}: unknown"
        return f"{label} {duration(self.seconds)} · cost {self.amount} ({self.rate})"


def checkpoint_line(ck: FoundCheckpoint, now: datetime) -> str:
    epoch = f", epoch {ck.epoch}" if ck.epoch is not None else ""
    age = duration((now - ck.modified_at).total_seconds())
    return f"{code(ck.name)} ({size(ck.size)}{epoch}, {age} ago)"


def _n(count: int) -> str:
    return f"{count} checkpoint{'s' if count != 1 else ''}"


def checkpoints_summary(
    listings: Sequence[CheckpointListing] | None,
    now: datetime,
    note: str,
    at_risk: Mapping[str, Sequence[FoundCheckpoint]] | None = None,
) -> str:
    """The terminate warning: what would be lost with the root volume. `at_risk`, by run:
    the checkpoints not in S3 (None: every listed one is)."""
    if listings is None:
        return f":grey_question: Checkpoints: could not be listed ({note})."
    found = [ls for ls in listings if ls.checkpoints]
    if not found:
        return ":white_circle: No checkpoints found on the instance."
    risky = at_risk if at_risk is not None else {ls.run_id or "": ls.checkpoints for ls in found}
    lost = [c for cks in risky.values() for c in cks]
    count = sum(len(ls.checkpoints) for ls in found)
    saved = count - len(lost)
    in_s3 = f" The other {saved} {'is' if saved == 1 else 'are'} in S3 already." if saved else ""
    if not lost:
        return (
            f":cloud: All {_n(count)} ({size(sum(ls.total_size for ls in found))}) on the instance are in S3 "
            "already: terminating loses none (`/runctl resume <run-id>` continues from there)."
        )
    total = sum(c.size for c in lost)
    newest = max(lost, key=lambda c: c.modified_at)
    runs = [rid for rid, cks in risky.items() if cks]
    shown = ", ".join(code(r) for r in runs[:5]) + (" …" if len(runs) > 5 else "")
    stuck = [c for c in lost if c.is_dir or c.size > SINGLE_PUT_LIMIT]
    movable = [c for c in lost if c not in stuck]
    cannot = (
        f" {_n(len(stuck))} ({', '.join(code(c.name) for c in stuck[:3])}) cannot be backed up (a directory, "
        "or above S3's 5 GB single upload) and would be lost either way."
        if stuck
        else ""
    )
    return (
        f":warning: *{_n(len(lost))} ({size(total)})* in run {shown} would be lost; newest "
        f"{checkpoint_line(newest, now)}.{in_s3}\n"
        f":floppy_disk: *[Terminate] backs up {_n(len(movable))} ({size(sum(c.size for c in movable))}) to S3 "
        f"first*, then terminates.{cannot} *[Terminate without backup] deletes them with the root volume.* "
        "Stop instead to keep them on the disk."
    )


def confirmation_blocks(
    inst: Instance,
    cost: Cost,
    live: Run | None,
    checkpoints: str,
    nonce: str,
    requester_id: str,
    expires_at: datetime,
    now: datetime,
    without_backup: bool = False,
) -> Message:
    """`without_backup`: checkpoints would be lost, so [Terminate] backs them up first and
    [Terminate without backup] is offered beside it."""
    head = f":warning: <@{requester_id}> asks to *terminate {inst.label}* · {inst.type} · `{inst.state}`"
    lines = [cost.text("Up")]
    if live is not None:
        since = live.started_at or live.created_at
        lines.append(
            f":arrows_counterclockwise: Live run `{live.run_id}`: <@{live.user_id}> · {code(live.script)} · "
            f"for {duration((now - since).total_seconds())}. It gets SIGTERM first: a script that "
            "handles it can save a checkpoint (one that does not stops at once, with the checkpoints it has)."
        )
    else:
        lines.append("No live run.")
    lines.append(checkpoints)
    confirm = ConfirmObject(
        title="Terminate for good?",
        text=clamp(f"{inst.label} and its root volume will be deleted. This cannot be undone.", 300),
        confirm="Terminate",
        deny="Keep it",
        style="danger",
    )
    buttons = [
        button("Terminate", ActionId.TERMINATE_CONFIRM, nonce, "danger", confirm),
    ]
    if without_backup:
        no_backup = ConfirmObject(
            title="Terminate without backup?",
            text=clamp(
                f"{inst.label}, its root volume and the checkpoints not in S3 will be deleted. This cannot be undone.",
                300,
            ),
            confirm="Delete them",
            deny="Keep them",
            style="danger",
        )
        buttons.append(button("Terminate without backup", ActionId.TERMINATE_NO_BACKUP, nonce, "danger", no_backup))
    buttons += [
        button("Stop instead", ActionId.TERMINATE_STOP_INSTEAD, nonce, "primary"),
        button("Cancel", ActionId.TERMINATE_CANCEL, nonce),
    ]
    blocks = confirmation(head, lines, BlockId.TERMINATE_ACTIONS, buttons, requester_id, expires_at)
    return Message(f"Terminate {inst.label}? Waiting for confirmation.", blocks)


def closed_blocks(text: str, footer: str = "") -> Message:
    """A message whose buttons are gone, replaced by what happened."""
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(text)))]
    if footer:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(footer))]))
    return Message(text.splitlines()[0], blocks)


def summary_blocks(lines: Sequence[str]) -> Message:
    """A report of several paragraphs: one section each, within Slack's limits."""
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clamp(line))) for line in lines[:MAX_SECTIONS] if line
    ]
    return Message((lines[0] if lines else ""), blocks)


def ready_blocks(text: str, resume: Run | None) -> Message:
    """The start report, with [Resume training] when the last run was stopped with a checkpoint."""
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(text)))]
    if resume is not None and resume.checkpoint is not None:
        ck = resume.checkpoint
        epoch = f" (epoch {ck.epoch})" if ck.epoch is not None else ""
        command = shlex.join([resume.script, *resume.args])
        blocks.append(
            SectionBlock(
                text=MarkdownTextObject(
                    text=clamp(
                        f"Run `{resume.run_id}` ({code(resume.script)} at {code(resume.ref)}) was stopped at "
                        f"{code(ck.name)}{epoch}. Resume it from there with the same command:\n"
                        f"{code(command)}"
                    )
                )
            )
        )
        blocks.append(
            ActionsBlock(
                block_id=BlockId.RESUME_ACTIONS,
                elements=[button("Resume training", ActionId.RESUME_TRAINING, resume.run_id, "primary")],
            )
        )
    return Message(text.splitlines()[0], blocks)
