"""The queue's messages (issue 27): the busy answer with [Queue after it], a queued run with
its [Cancel], the live run's thread told who is next, and `/runctl queue`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from slack_sdk.models.blocks import ActionsBlock, Block

from workers.slack.blocks import button, expiry
from workers.slack.escape import code
from workers.slack.format import duration
from workers.slack.ids import ActionId, BlockId
from workers.slack.messages import Message
from workers.slack.messages.run import progress_text, text_blocks
from workers.state.locks import Holder
from workers.state.run_queue import Entry
from workers.state.runs import Run


def plain(text: str) -> list[Block]:
    return text_blocks(text)


def _what(entry: Entry) -> str:
    at = f" at `{entry.sha[:10]}`" if entry.sha else ""
    nodes = f" on {len(entry.nodes)} nodes ({', '.join(f'`{n}`' for n in entry.nodes)})" if entry.command.nodes else ""
    return f"{code(entry.command.script)}{at}{nodes}"


def eta(live: Run | None, now: datetime) -> str:
    """When the live run should end, from its progress; "" when nothing tells."""
    if live is None or live.progress is None or not live.progress.eta_seconds:
        return ""
    left = live.progress.eta_seconds
    return f"ETA {duration(left)} (about {expiry(now + timedelta(seconds=left))})"


def busy_offer(instance_id: str, holder: Holder, live: Run | None, waiting: int, nonce: str, now: datetime) -> Message:
    """`train` on a busy instance: who holds it, since when, its progress and ETA, and [Queue after it]."""
    since = holder.since
    lines = [
        f":hourglass: `{instance_id}` is busy: <@{holder.user_id}> is training {code(holder.script)} "
        f"(run `{holder.run_id}`) since {expiry(since)} ({duration((now - since).total_seconds())})."
    ]
    if live is not None and live.progress is not None:
        lines.append(progress_text(live.progress))
    if waiting:
        lines.append(f"{waiting} run{'s' if waiting != 1 else ''} queued before yours.")
    lines.append("Nothing was started. [Queue after it] checks your run now and starts it when the instance is free.")
    text = "\n".join(lines)
    actions = ActionsBlock(
        block_id=BlockId.QUEUE_ACTIONS,
        elements=[button("Queue after it", ActionId.QUEUE_AFTER, nonce, style="primary")],
    )
    return Message(text, [*text_blocks(text), actions])


def _cancel(entry: Entry) -> ActionsBlock:
    return ActionsBlock(
        block_id=BlockId.QUEUE_ACTIONS, elements=[button("Cancel", ActionId.QUEUE_CANCEL, entry.entry_id)]
    )


def queued(entry: Entry, position: int, live: Run | None, now: datetime) -> Message:
    """To the requester: queued, where, and when it may start."""
    when = f"when <@{live.user_id}>'s run `{live.run_id}` ends" if live else "as soon as the instance is free"
    due = eta(live, now) if position == 1 else ""
    where = "" if entry.command.nodes else f" on `{entry.instance_id}`"
    also = " and every node is free" if entry.command.nodes else ""
    text = (
        f":inbox_tray: Queued run `{entry.entry_id}`: {_what(entry)}{where}, position {position}. "
        f"It starts {when}{also}{' (' + due + ')' if due else ''}; you'll be mentioned in its "
        f"message. `/runctl queue cancel {entry.entry_id}` cancels it."
    )
    return Message(text, [*text_blocks(text), _cancel(entry)])


def next_in_thread(entry: Entry, position: int) -> Message:
    """In the live run's thread: the queue behind it grows."""
    text = (
        f":inbox_tray: {'next' if position == 1 else f'#{position} in line'}: <@{entry.user_id}> "
        f"{_what(entry)}, queued {expiry(entry.queued_at)} (`{entry.entry_id}`)."
    )
    return Message(text, [*text_blocks(text), _cancel(entry)])


def next_up(entry: Entry) -> str:
    """In the ended run's thread."""
    return (
        f":arrow_forward: Next on `{entry.instance_id}`: <@{entry.user_id}>'s {_what(entry)} "
        f"(queued {expiry(entry.queued_at)}, `{entry.entry_id}`) is starting."
    )


def settled(entry: Entry, outcome: str) -> str:
    return f":arrow_forward: Queued run `{entry.entry_id}` of <@{entry.user_id}> ({_what(entry)}): {outcome}."


def queue_lines(entries: Sequence[Entry]) -> list[str]:
    return [
        f"{i}. `{e.entry_id}` <@{e.user_id}> {_what(e)}, queued {expiry(e.queued_at)}"
        for i, e in enumerate(entries, start=1)
    ]


def listing(listed: Sequence[tuple[str, Run | None, list[Entry]]], now: datetime, only: str | None) -> Message:
    """`/runctl queue`: each instance's live run, then its queue with position, requester and ETA."""
    shown = [(iid, live, entries) for iid, live, entries in listed if entries or only]
    if not shown:
        return Message("No queued runs" + (f" on `{only}`." if only else "."), [])
    lines: list[str] = []
    for iid, live, entries in shown:
        head = f"*`{iid}`*: "
        head += (
            f"live run `{live.run_id}` of <@{live.user_id}> {code(live.script)}"
            + (f", {eta(live, now)}" if eta(live, now) else "")
            if live
            else "no live run"
        )
        lines.append(head)
        if not entries:
            lines.append("  nothing queued")
        for i, e in enumerate(entries, start=1):
            due = f", starts after the live run ({eta(live, now)})" if i == 1 and eta(live, now) else ""
            lines.append(f"  {i}. `{e.entry_id}` <@{e.user_id}> {_what(e)}, queued {expiry(e.queued_at)}{due}")
    text = "\n".join(lines)
    return Message(text, text_blocks(text))
