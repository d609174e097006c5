"""`/runctl start` (offer to resume) and the start report's [Resume training] click."""

from __future__ import annotations

from workers import policy
from workers.commands import Actor, StartCommand, TrainCommand
from workers.jobs import funnel, queued
from workers.jobs.caps import admit_start
from workers.jobs.confirm import answer
from workers.jobs.funnel import Job
from workers.jobs.session import holder
from workers.queueing import enqueue_command
from workers.services import Services
from workers.slack.format import duration
from workers.slack.messages.lifecycle import closed_blocks, ready_blocks
from workers.state.locks import operation
from workers.state.runs import new_run, new_run_id
from workers.state.uptime import UptimeLedger

RESUME_CLAIM_SECONDS = 7 * 86400


@funnel.command(StartCommand)
def start(job: Job, cmd: StartCommand) -> str:
    return start_flow(job.svc, cmd.instance_id, job.actor, cmd.wait)


@funnel.click("click resume training", 1, "train")
def resume(job: Job, run_id: str, message_ts: str) -> str:
    """[Resume training] (`resume(run_id, actor, message_ts)`)."""
    return resume_flow(job.svc, run_id, job.actor, message_ts)


def start_flow(svc: Services, instance_id: str, actor: Actor, wait: bool = True) -> str:
    with operation(svc.redis, instance_id, holder(svc, actor, "start")):
        text, ready = _start_locked(svc, instance_id, actor, wait)
    if not ready:
        answer(svc, actor, text)
        return text
    last = svc.runs.latest(instance_id)
    offer = last if last and last.ended_by in ("stop", "force") and last.checkpoint else None
    body, blocks = ready_blocks(text, offer)
    svc.notifier.try_post(actor.channel_id, body, blocks, what="the start report")
    queued.after_start(svc, instance_id)  # runs queued while it was stopped start now
    return body


def _start_locked(svc: Services, iid: str, actor: Actor, wait: bool) -> tuple[str, bool]:
    fleet = svc.fleet
    inst = fleet.get(iid)
    policy.check(svc.settings, actor.user_id, "start", policy.instance_owner(svc.redis, iid, lambda _: inst.tags))
    if inst.state != "stopped":
        said = {
            "running": f"{inst.label} is already running. `/runctl status {iid}` shows what it is doing.",
            "pending": f"{inst.label} is already starting.",
            "stopping": f"{inst.label} is still stopping; run `/runctl start {iid}` again once it is stopped.",
        }.get(inst.state)
        if said is None:
            ever = " It can never run again." if inst.state in ("terminated", "shutting-down") else ""
            said = f"{inst.label} is `{inst.state}`, so there is nothing to start.{ever}"
        return said, False
    began = svc.clock()
    with admit_start(svc, inst, actor.user_id):  # a launched instance counts against its launcher's caps
        fleet.start(iid)
    if not wait:
        return (
            f":arrow_forward: <@{actor.user_id}> started *{inst.label}* (`--no-wait`). "
            f"`/runctl status {iid}` shows when it is running."
        ), True
    budget = svc.settings.RUNCTL_PENDING_WAIT_SECONDS
    inst = fleet.wait_for_state(iid, ("running",), budget)
    UptimeLedger(svc.redis).mark_running(iid, inst.launch_time or svc.clock())
    svc.fleet.wait_for_agent(inst)
    took = duration((svc.clock() - began).total_seconds())
    return (
        f":white_check_mark: <@{actor.user_id}> started *{inst.label}* ({inst.type}): `running`, "
        f"SSM agent Online, ready in {took}."
    ), True


def resume_flow(svc: Services, run_id: str, actor: Actor, message_ts: str) -> str:
    """[Resume training]: the stopped run's exact command again, from its checkpoint directory."""
    old = svc.runs.get(run_id)
    if old is None:
        text = f"Run `{run_id}` is no longer known to runctl, so it can't be resumed."
        answer(svc, actor, text)
        return text
    # It writes into the stopped run's checkpoint directory: that run's owner's, or an admin's.
    policy.check(svc.settings, actor.user_id, "resume", old.user_id)
    new_id = new_run_id(svc.clock())
    claimed = svc.redis.set(f"runctl:resume:{run_id}", f"{new_id} {actor.user_id}", nx=True, ex=RESUME_CLAIM_SECONDS)
    if not claimed:
        raw = svc.redis.get(f"runctl:resume:{run_id}")
        prior = (raw.decode() if isinstance(raw, bytes) else str(raw or "")).split()
        by = f" by <@{prior[1]}> as run `{prior[0]}`" if len(prior) == 2 else ""
        text = f"Run `{run_id}` was already resumed{by}."
        answer(svc, actor, text)
        return text
    cmd = TrainCommand.from_run(old)
    run = new_run(svc, cmd, actor, new_id).model_copy(
        update={
            "channel_id": old.channel_id,
            "checkpoint_run_id": old.checkpoint_run_id or old.run_id,
            "notes": [f":repeat: Resumes run `{old.run_id}` from its checkpoint directory."],
        }
    )
    svc.runs.create(run)
    enqueue_command(svc.queue, cmd, actor, run.run_id)
    text, blocks = closed_blocks(
        f":repeat: <@{actor.user_id}> resumed run `{old.run_id}` as run `{run.run_id}` on "
        f"`{old.instance_id}`; it continues from its last checkpoint."
    )
    svc.notifier.try_update(actor.channel_id, message_ts, text, blocks, what="the start report")
    return text
