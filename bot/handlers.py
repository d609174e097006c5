"""Thin listeners: parse (middleware), ack, queue."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from slack_bolt import Ack, App

from bot.actions import launch, lifecycle, logs, warnings
from bot.actions import queue as queue_actions
from bot.grammar import help_text
from workers.commands import (
    Actor,
    AnyCommand,
    AuditCommand,
    ChartCommand,
    CheckpointsCommand,
    HelpCommand,
    LogsCommand,
    QueueCommand,
    ResourcesCommand,
    StatusCommand,
    TrainCommand,
)
from workers.queueing import enqueue_command, unreachable
from workers.slack.escape import code
from workers.state.runs import new_run_id

log = logging.getLogger(__name__)

# Commands whose answer is the whole conversation: the worker answers within seconds.
QUICK = (
    StatusCommand,
    CheckpointsCommand,
    LogsCommand,
    AuditCommand,
    ResourcesCommand,
    ChartCommand,
    QueueCommand,
)


def runctl(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    command: AnyCommand = context["command"]
    queue: Queue = context["queue"]
    batch: Pipeline = context["batch"]  # holds the audit record of this request (bot.middleware)
    actor = Actor.from_command(body)
    if isinstance(command, HelpCommand):
        ack(text=help_text(command.topic), response_type="ephemeral")
        try:
            batch.execute()
        except RedisError:
            log.warning("help answered; its audit record was lost (Redis did not answer)")
        return
    # The job is written before the ack says "queued": a Redis that stops answering now gets
    # the plain answer, never a promise.
    busy = None
    if isinstance(command, TrainCommand):
        try:
            busy = queue_actions.busy(context["redis"], command, actor, datetime.now(UTC))
        except RedisError:
            busy = None  # the worker refuses a busy instance too
    blocks = None
    if busy is not None:
        # A live run holds the instance: who, since when, how far, and [Queue after it]; nothing queued.
        said, blocks = busy
    elif isinstance(command, TrainCommand) and command.queue:
        entry_id = queue_actions.queue_it(queue, command, actor, pipeline=batch)
        said = (
            f":hourglass_flowing_sand: Checking run `{entry_id}` ({code(command.script)} on "
            f"`{command.instance_id}`) to queue it; the answer follows here."
        )
    elif isinstance(command, TrainCommand):
        run_id = new_run_id()
        said = (
            f":hourglass_flowing_sand: Queued run `{run_id}`: {code(command.script)} on "
            f"`{command.instance_id}`. Once its checks pass I'll post it in this channel and "
            "follow it in the thread; if they fail, only you hear why."
        )
        enqueue_command(queue, command, actor, run_id, pipeline=batch)
    elif isinstance(command, QUICK):
        # The answer itself comes within seconds (ephemeral, or the response_url): one
        # message, so the ack says nothing (Slack shows nothing for an empty 200).
        said = ""
        enqueue_command(queue, command, actor, pipeline=batch)
    else:
        said = f":hourglass_flowing_sand: `{command.name}` queued; the answer follows here."
        enqueue_command(queue, command, actor, pipeline=batch)
    try:
        batch.execute()
    except RedisError:
        log.warning("could not queue %s: Redis did not answer", command.name, exc_info=True)
        said, blocks = unreachable().as_text(), None
    if said and blocks:
        ack(text=said, blocks=blocks, response_type="ephemeral")
    elif said:
        ack(text=said, response_type="ephemeral")
    else:
        ack()


def register_actions(app: App) -> None:
    lifecycle.register(app)
    logs.register(app)
    warnings.register(app)
    launch.register(app)
    queue_actions.register(app)
