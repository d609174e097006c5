"""`/runctl stop`: checkpoint first (SIGTERM to the live runs), stop the instance, post the summary.

It holds the per-instance operation lock, so it never interleaves with a train launch or
another lifecycle operation on the same instance."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from workers import policy
from workers.commands import Actor, StopCommand
from workers.errors import AgentOffline, RemoteError, WrongState
from workers.jobs import funnel, queued
from workers.jobs.confirm import answer
from workers.jobs.funnel import Job
from workers.jobs.halt import Halt, Halter
from workers.jobs.session import holder, session_cost
from workers.services import Services
from workers.slack.escape import code
from workers.slack.format import duration
from workers.slack.messages.lifecycle import summary_blocks
from workers.state.locks import operation
from workers.state.uptime import UptimeLedger

log = logging.getLogger(__name__)

STOPPED_WAIT_SECONDS = 600


@funnel.command(StopCommand)
def stop(job: Job, cmd: StopCommand) -> str:
    return stop_flow(job.svc, cmd.instance_id, job.actor, cmd.grace, cmd.force)


def stop_flow(
    svc: Services,
    instance_id: str,
    actor: Actor,
    grace: int | None = None,
    force: bool = False,
    thread_ts: str | None = None,
) -> str:
    """Checkpoint and stop the live run, stop the instance, post the summary (in `thread_ts`
    when given); returns the outcome in a line. Raises RunctlError when the stop did not happen.
    A multi-node run's nodes stop together: each node's operation lock (in one order, as a
    multi-node train takes them) and each node's queue are held."""
    live = svc.runs.live_on(instance_id)
    nodes = sorted(live.node_ids) if live is not None else [instance_id]
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(operation(svc.redis, node, holder(svc, actor, "stop")))
        holds = [stack.enter_context(queued.held_while_stopping(svc, node)) for node in nodes]
        done, lines = _stop_locked(svc, instance_id, actor, grace, force)
        for each in holds:
            each.stopped = done
    if done:
        lines[1:1] = [note for hold, node in zip(holds, nodes, strict=True) if (note := hold.note(svc, node))]
    if not done:
        answer(svc, actor, lines[0], thread_ts)
        return lines[0]
    text, blocks = summary_blocks(lines)
    svc.notifier.try_post(actor.channel_id, text, blocks, thread_ts, what="the stop summary")
    return lines[0]


def _stop_locked(svc: Services, iid: str, actor: Actor, grace: int | None, force: bool) -> tuple[bool, list[str]]:
    """(True, summary paragraphs) once stopped; (False, [reason]) when nothing was done."""
    fleet = svc.fleet
    inst = fleet.get(iid)
    policy.check(svc.settings, actor.user_id, "stop", policy.instance_owner(svc.redis, iid, lambda _: inst.tags))
    if inst.state == "stopping":
        return False, [f"{inst.label} is already stopping. `/runctl status {iid}` shows when it is stopped."]
    if inst.state == "stopped":
        return False, [f"{inst.label} is already stopped; nothing to do. `/runctl start {iid}` starts it."]
    if inst.state in ("terminated", "shutting-down"):
        raise WrongState(
            f"{inst.label} is {inst.state}; it cannot be stopped.", state=inst.state, fix="/runctl resources"
        )
    if inst.state == "pending":
        inst = fleet.wait_for_state(iid, ("running",), svc.settings.RUNCTL_PENDING_WAIT_SECONDS)
    known = svc.runs.live_on(iid)
    others = [n for n in known.nodes if n != iid] if known else []  # a multi-node run's other nodes stop too
    for other in others:
        policy.check(
            svc.settings, actor.user_id, "stop", policy.instance_owner(svc.redis, other, lambda i: fleet.get(i).tags)
        )
    if force:
        policy.check(svc.settings, actor.user_id, "force")
    if inst.lifecycle == "spot" and fleet.spot_request_type(iid) != "persistent":
        raise WrongState(
            f"{inst.label} is a one-time spot instance: AWS cannot stop it, so runctl did not touch "
            f"{'run `' + known.run_id + '`' if known else 'it'}.",
            state=inst.state,
            why="Only instances of a persistent spot request can be stopped; a one-time spot "
            "instance can only run or be terminated (which deletes its disk and the checkpoints on it).",
            fix=f"`/runctl terminate {iid}` (asks for confirmation; a live training gets SIGTERM and "
            f"{svc.settings.RUNCTL_STOP_GRACE_SECONDS} s to checkpoint first), or keep it running "
            "and let the training finish.",
        )
    wait = svc.settings.RUNCTL_STOP_GRACE_SECONDS if grace is None else grace
    halter = Halter(svc, inst, actor, wait, force, "stop")
    halts: list[Halt] = []
    try:
        ping = fleet.agent_status([iid]).get(iid)
        if ping != "Online":
            raise AgentOffline(f"Its SSM agent is {ping or 'not registered'}.", fix="")
        halts = halter.halt_all(known)
    except (AgentOffline, RemoteError) as exc:
        # Powering off now would kill a training mid-epoch with no SIGTERM: only on --force.
        if not force:
            kind = AgentOffline if isinstance(exc, AgentOffline) else RemoteError
            raise kind(
                f"{inst.label} was not stopped: runctl can't reach it to let its training save a checkpoint. "
                f"{exc.what}",
                why=exc.why or "runctl signals the training through SSM Run Command before powering off.",
                fix=f"{exc.fix or 'Fix the SSM agent, then retry.'} Or `/runctl stop {iid} --force` to power it "
                "off without saving (the training gets no SIGTERM).",
            ) from exc
        log.warning("stop --force of %s without signalling its training: %s", iid, exc.what)
    now = svc.clock()
    cost = session_cost(svc, inst, now)
    for each in (iid, *others):
        fleet.stop(each)
    for each in others:
        fleet.wait_for_state(each, ("stopped",), STOPPED_WAIT_SECONDS)
        UptimeLedger(svc.redis).mark_stopped(each, now)
    inst = fleet.wait_for_state(iid, ("stopped",), STOPPED_WAIT_SECONDS)
    UptimeLedger(svc.redis).mark_stopped(iid, now)
    lines = [f":double_vertical_bar: <@{actor.user_id}> stopped *{inst.label}* ({inst.type}); it is `stopped`."]
    for halt in halts:
        run = halt.run
        if run is not None:
            took = duration(((run.ended_at or now) - (run.started_at or run.created_at)).total_seconds())
            lines.append(f"Run `{run.run_id}` ({code(run.script)}, <@{run.user_id}>) ran {took}. {halt.report}")
        else:
            lines.append(halt.report)
    if not halts:
        lines.append(
            "No training was running."
            if not force or known is None
            else "The instance was unreachable, so its training was not signalled."
        )
    if others:
        lines.append(f"The run's other node{'s' if len(others) != 1 else ''} ({', '.join(others)}) stopped with it.")
    lines.append(cost.text("Up this session"))
    if inst.lifecycle == "spot":
        lines.append(
            f":information_source: A persistent spot request's instance: its request is `disabled` while "
            f"stopped, and `/runctl start {iid}` starts it again when spot capacity allows."
        )
    return True, lines
