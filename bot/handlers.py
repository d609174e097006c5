"""Thin listeners: parse (middleware), ack, queue."""

from __future__ import annotations

from typing import Any

from redis.client import Pipeline
from rq import Queue
from slack_bolt import Ack, App

from bot.grammar import help_text
from workers.commands import AnyCommand, HelpCommand, Requester, TrainCommand
from workers.queueing import enqueue
from workers.slack.escape import code
from workers.state.runs import new_run_id


def requester_of(body: dict[str, Any]) -> Requester:
    return Requester(
        user_id=body.get("user_id", ""),
        channel_id=body.get("channel_id", ""),
        text=body.get("text", ""),
        user_name=body.get("user_name", ""),
        response_url=body.get("response_url"),
        request_id=body.get("trigger_id", ""),
    )


def runctl(ack: Ack, body: dict[str, Any], context: dict[str, Any]) -> None:
    command: AnyCommand = context["command"]
    queue: Queue = context["queue"]
    batch: Pipeline = context["batch"]  # holds the audit record of this request (bot.middleware)
    who = requester_of(body)
    if isinstance(command, HelpCommand):
        ack(text=help_text(command.topic), response_type="ephemeral")
    elif isinstance(command, TrainCommand):
        run_id = new_run_id()
        ack(
            text=f":hourglass_flowing_sand: Queued run `{run_id}`: {code(command.script)} on "
            f"`{command.instance_id}`. I'll post it in this channel and follow it in the thread.",
            response_type="ephemeral",
        )
        enqueue(queue, command, who, run_id, pipeline=batch)
    else:
        ack(
            text=f":hourglass_flowing_sand: `{command.name}` queued; the answer follows here.",
            response_type="ephemeral",
        )
        enqueue(queue, command, who, pipeline=batch)
    batch.execute()


def register_actions(app: App) -> None:
    from bot.actions import launch, lifecycle, warnings

    lifecycle.register(app)
    warnings.register(app)
    launch.register(app)
