"""The queue's front door (issue 27): a `train` on a busy instance is answered at once with
who holds it and [Queue after it]; that click and `--queue` queue the run's checks; [Cancel]
on a queued run. Each acks first; the worker checks everything again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis import Redis
from slack_bolt import Ack, App
from slack_sdk import WebClient

from bot.middleware import Click
from workers.commands import INSTANCE_ID, Actor, TrainCommand
from workers.queueing import CommandArgs, EntryClickArgs, JobPath, enqueue
from workers.slack.client import privately
from workers.slack.ids import ActionId
from workers.slack.messages import Message
from workers.slack.messages.queue import busy_offer
from workers.state.locks import Holder, train_lock
from workers.state.run_queue import QueueStore, new_entry_id, offer, peek_offer, take_offer
from workers.state.runs import RunStore


def busy_lock(redis: Redis, command: TrainCommand) -> str | None:
    """The train lock to look at before queueing `command` (None: no look; a name, or a lock
    taken after this look, is refused by the worker instead)."""
    if command.force or command.queue or not INSTANCE_ID.fullmatch(command.instance_id):
        return None
    return train_lock(redis, command.instance_id).key


def busy(redis: Redis, command: TrainCommand, actor: Actor, held: str, now: datetime) -> Message | None:
    """The busy answer for `command`, whose instance's train lock holds `held` (None: not a
    holder this can read)."""
    try:
        holder = Holder.model_validate_json(held)
    except ValueError:
        return None
    live = RunStore(redis).get(holder.run_id)
    waiting = QueueStore(redis).waiting(command.instance_id)
    nonce = offer(redis, actor, command)
    return busy_offer(command.instance_id, holder, live, waiting, nonce, now)


def queue_it(queue: Any, command: TrainCommand, actor: Actor, pipeline: Any = None) -> str:
    """`train … --queue`: the worker checks it, then queues it."""
    entry_id = new_entry_id(datetime.now(UTC))
    enqueue(queue, JobPath.QUEUE_ADD, CommandArgs(command=command, run_id=entry_id), actor, pipeline=pipeline)
    return entry_id


def queue_after_click(ack: Ack, context: dict[str, Any], client: WebClient) -> None:
    ack()
    click: Click = context["click"]
    redis: Redis = context["redis"]
    found = peek_offer(redis, click.value)
    if found is None:
        privately(client, click.actor.channel_id, click.actor.user_id, "This offer expired; send the command again.")
        return
    if found.actor.user_id != click.actor.user_id:
        privately(
            client,
            click.actor.channel_id,
            click.actor.user_id,
            f"Only <@{found.actor.user_id}>, who asked, can queue this run; nothing was done.",
        )
        return
    if take_offer(redis, click.value) is None:
        return  # a double click: the first queued it
    queue_it(context["queue"], found.command.model_copy(update={"queue": True}), found.actor)


def cancel_click(ack: Ack, context: dict[str, Any]) -> None:
    ack()
    click: Click = context["click"]
    args = EntryClickArgs(entry_id=click.value, message_ts=click.message_ts)
    enqueue(context["queue"], JobPath.QUEUE_CANCEL_CLICK, args, click.actor, what=click.what)


def register(app: App) -> None:
    app.action(ActionId.QUEUE_AFTER.value)(queue_after_click)
    app.action(ActionId.QUEUE_CANCEL.value)(cancel_click)
