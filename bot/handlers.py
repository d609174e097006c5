"""Thin listeners: parse (middleware), ack, queue."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from slack_bolt import Ack, App, BoltRequest

from bot.actions import launch, lifecycle, logs, warnings
from bot.actions import queue as queue_actions
from bot.grammar import help_text
from bot.middleware import admit_command
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


def runctl(ack: Ack, body: dict[str, Any], request: BoltRequest, context: dict[str, Any]) -> None:
    admitted = admit_command(ack, body, request, context)
    if admitted is None:
        return  # answered at the door: a usage error, a refusal, a replay, or Redis down
    command, door = admitted  # the door: its replay and rate check and audit record, written with the job
    queue: Queue = context["queue"]
    redis: Redis = context["redis"]
    if isinstance(command, HelpCommand):
        try:
            if door.through(ack, context) is None:
                return  # a replay
        except RedisError:
            log.warning("help answered; its audit record was lost (Redis did not answer)")
        ack(text=help_text(command.topic), response_type="ephemeral")
        return
    actor = Actor.from_command(body)
    blocks = None
    try:
        # The job is recorded on a pipeline that the door's script writes with the audit record
        # when the request is admitted (one round trip), before the ack says "queued": a Redis
        # that stops answering now gets the plain answer, never a promise.
        batch = redis.pipeline()
        batch.multi()  # RQ refuses a pipeline that has commands but no MULTI
        said, lock = _record_job(queue, redis, command, actor, batch)
        passed = door.through(ack, context, batch, lock)
        if passed is None:
            return  # a replay, or over the rate limit: answered
        if passed.holder is not None and isinstance(command, TrainCommand):
            # A live run holds the instance: who, since when, how far, and [Queue after it]; nothing queued.
            busy = queue_actions.busy(redis, command, actor, passed.holder, datetime.now(UTC))
            if busy is None:
                batch.execute()  # not a holder we can read: the train goes on, and its worker refuses a busy instance
            else:
                said, blocks = busy
    except RedisError:
        log.warning("could not queue %s: Redis did not answer", command.name, exc_info=True)
        said, blocks = unreachable().as_text(), None
    if said and blocks:
        ack(text=said, blocks=blocks, response_type="ephemeral")
    elif said:
        ack(text=said, response_type="ephemeral")
    else:
        ack()


def _record_job(
    queue: Queue, redis: Redis, command: AnyCommand, actor: Actor, batch: Pipeline
) -> tuple[str, str | None]:
    """Record the command's job on `batch`: what the ack says, and the train lock to look at
    first (held: nothing is queued, the ack says who holds it and offers [Queue after it])."""
    if isinstance(command, TrainCommand) and command.queue:
        entry_id = queue_actions.queue_it(queue, command, actor, pipeline=batch)
        said = (
            f":hourglass_flowing_sand: Checking run `{entry_id}` ({code(command.script)} on "
            f"`{command.instance_id}`) to queue it; the answer follows here."
        )
        return said, None
    if isinstance(command, TrainCommand):
        run_id = new_run_id()
        enqueue_command(queue, command, actor, run_id, pipeline=batch)
        said = (
            f":hourglass_flowing_sand: Queued run `{run_id}`: {code(command.script)} on "
            f"`{command.instance_id}`. Once its checks pass I'll post it in this channel and "
            "follow it in the thread; if they fail, only you hear why."
        )
        return said, queue_actions.busy_lock(redis, command)
    enqueue_command(queue, command, actor, pipeline=batch)
    if isinstance(command, QUICK):
        # The answer itself comes within seconds (ephemeral, or the response_url): one
        # message, so the ack says nothing (Slack shows nothing for an empty 200).
        return "", None
    return f":hourglass_flowing_sand: `{command.name}` queued; the answer follows here.", None


def register_actions(app: App) -> None:
    lifecycle.register(app)
    logs.register(app)
    warnings.register(app)
    launch.register(app)
    queue_actions.register(app)
