"""Stopping what nobody uses: `train --then stop|terminate`, `/runctl autostop`, and the
sweep's autostop check with its heads-up, [Keep running 1h] and [Stop now]."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from workers import audit, policy, remote
from workers.aws.instance import Instance
from workers.commands import Actor, AutostopCommand
from workers.cost.fleetview import Row
from workers.cost.pricing import format_rate, hourly_price, load_price_book
from workers.errors import PermissionDenied, RunctlError
from workers.jobs import funnel, spot_request
from workers.jobs.confirm import answer
from workers.jobs.funnel import SYSTEM, Job
from workers.jobs.session import holder
from workers.jobs.stop import STOPPED_WAIT_SECONDS, stop_flow
from workers.jobs.terminate import TERMINATED_WAIT_SECONDS
from workers.queueing import InstanceArgs, JobPath, RunArgs, enqueue
from workers.remote import gpu
from workers.services import Services, current
from workers.slack.format import duration
from workers.slack.messages.launch import headsup_blocks
from workers.slack.messages.lifecycle import closed_blocks
from workers.state import autostop as rules
from workers.state.autostop import AutostopStore, Setting, Verdict
from workers.state.locks import operation, train_lock
from workers.state.run_queue import QueueStore
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger

log = logging.getLogger(__name__)


# --- cost saved -------------------------------------------------------------------


def saving(svc: Services, inst: Instance) -> str:
    lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
    try:
        price = hourly_price(
            load_price_book(), svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle
        )
    except RunctlError as exc:  # a failed price lookup never blocks a stop
        log.warning("price of %s: %s", inst.id, exc.what)
        return "saves its hourly price (unknown)"
    rate = price.usd_per_hour
    return f"saves ${format_rate(rate)}/h" if rate is not None else "saves its hourly price (unknown)"


def _idle_stop(svc: Services, iid: str, how: str, actor: Actor = SYSTEM) -> tuple[Instance | None, str]:
    """Stop (or terminate) iid unless anything trains on it: (instance, what else was done) when it
    did (a terminate cancels the spot request first), (None, why not) when it did not.
    For a person's deferred action (`actor`), their right to `how` it now, against its owner now,
    or PermissionDenied."""
    with operation(svc.redis, iid, holder(svc, actor, how)):
        inst = svc.fleet.get(iid)
        if inst.state != "running":
            return None, f"it is `{inst.state}`"
        live = svc.runs.live_on(iid)
        if live is not None or train_lock(svc.redis, iid).holder() is not None:
            return None, f"run `{live.run_id}` is live on it" if live else "a training is starting on it"
        waiting = QueueStore(svc.redis).waiting(iid)
        if waiting:  # the next run in line needs it (issue 27)
            return None, f"{waiting} queued run{'s' if waiting != 1 else ''} wait{'s' if waiting == 1 else ''} for it"
        if actor is not SYSTEM:
            owner = policy.instance_owner(svc.redis, iid, lambda _: inst.tags)
            policy.recheck(svc.settings, actor, how, owner_id=owner)
        # The pid files on the instance are the truth: a run runctl lost track of still counts.
        probe = svc.fleet.run(iid, remote.probe_live_runs(svc.settings.RUNCTL_REMOTE_ROOT))
        alive = [line.split()[1] for line in probe.stdout.splitlines() if line.startswith("live ")]
        if alive:
            return None, f"run `{alive[0]}` is alive on it"
        now = svc.clock()
        if how == "terminate":
            done = spot_request.cancel_for(svc, inst, "terminated")
            svc.fleet.terminate(iid)
            inst = svc.fleet.wait_for_state(iid, ("shutting-down", "terminated"), TERMINATED_WAIT_SECONDS)
            UptimeLedger(svc.redis).observe(iid, "terminated", None, now)
            return inst, done
        else:
            svc.fleet.stop(iid)
            inst = svc.fleet.wait_for_state(iid, ("stopped",), STOPPED_WAIT_SECONDS)
            UptimeLedger(svc.redis).mark_stopped(iid, now)
        return inst, ""


# --- train --then ------------------------------------------------------------------


def after_run(svc: Services, run: Run, backed_up: bool = False) -> None:
    """The monitor calls this once a run has ended, however it ended: `--then` acts for the
    run's requester, with the rights they have when it fires. An interrupted `--auto-resume`
    run's instance holds the checkpoint its SIGTERM saved: the spot replacement calls this
    again (`backed_up`) once the backup finished, never before (workers/jobs/spot.py)."""
    if run.spot_notice and run.auto_resume and not backed_up:
        return
    if run.then in ("stop", "terminate"):
        requester = Actor(user_id=run.user_id, channel_id=run.channel_id)
        enqueue(svc.queue, JobPath.THEN, RunArgs(run_id=run.run_id), requester, what=f"`--then {run.then}` of your run")


@funnel.system("train --then")
def then(run_id: str, raw_actor: dict[str, Any] | None = None) -> str:
    svc = current()
    run = svc.runs.get(run_id)
    if run is None:
        return "unknown run"
    requester = funnel.actor_of(raw_actor) if raw_actor else Actor(user_id=run.user_id, channel_id=run.channel_id)
    # A multi-node run's nodes stop (or terminate) together, each as its own instance would.
    return "\n".join(_then_one(svc, run, iid, requester) for iid in run.node_ids)


def _then_one(svc: Services, run: Run, iid: str, requester: Actor) -> str:
    try:
        before = svc.fleet.get(iid)
        cost = saving(svc, before)
        inst, why_not = _idle_stop(svc, iid, run.then, requester)
    except PermissionDenied as exc:
        return _revoked(svc, run, requester, before, exc)
    except RunctlError as exc:
        fix = f" Fix: {exc.fix}" if exc.fix else ""
        _reply(svc, run, f":warning: `--then {run.then}`: {iid} was left running: {exc.what}{fix}")
        return exc.what
    if inst is None:
        text = f":information_source: `--then {run.then}`: `{iid}` was left running, because {why_not}."
        _reply(svc, run, text)
        return text
    verb = "terminated" if run.then == "terminate" else "stopped"
    back = f" {why_not}" if why_not else ""  # what else was done: the spot request cancelled
    back += "" if run.then == "terminate" else f" `/runctl start {inst.id}` brings it back."
    text = (
        f":double_vertical_bar: Run `{run.run_id}` ended, so *{inst.label}* was {verb} "
        f"(`--then {run.then}`): {cost}.{back}"
    )
    _reply(svc, run, text)
    audit.record(
        svc.redis,
        svc.settings.RUNCTL_AUDIT_MAXLEN,
        audit.of(requester, "allowed", f"{verb} after the run (--then {run.then})", run.run_id, inst.id),
    )
    return text


def _revoked(svc: Services, run: Run, requester: Actor, inst: Instance, exc: PermissionDenied) -> str:
    """`--then` refused when it fired: the instance keeps running; the thread says why and who may stop it."""
    owner = policy.instance_owner(svc.redis, inst.id, lambda _: inst.tags)
    text = (
        f":information_source: `--then {run.then}`: *{inst.label}* was left running: the policy no longer "
        f"lets you `{run.then}` it. {exc.what} Who may stop it: {policy.who_may(svc.settings, 'stop', owner)}, "
        f"with `/runctl stop {inst.id}`."
    )
    _reply(svc, run, text)
    audit.record(
        svc.redis,
        svc.settings.RUNCTL_AUDIT_MAXLEN,
        audit.of(requester, "refused", f"--then {run.then} when the run ended: {exc.what}", run.run_id, inst.id),
    )
    return text


def _reply(svc: Services, run: Run, text: str) -> None:
    svc.notifier.try_post(
        run.channel_id, f"<@{run.user_id}> {text}", thread_ts=run.message_ts, what=f"a reply on run {run.run_id}"
    )


# --- /runctl autostop -------------------------------------------------------------


def owner_of(svc: Services, inst: Instance) -> str | None:
    return policy.instance_owner(svc.redis, inst.id, lambda _: inst.tags)


@funnel.command(AutostopCommand)
def autostop(job: Job, cmd: AutostopCommand) -> str:
    svc, actor = job.svc, job.actor
    store = AutostopStore(svc.redis)
    inst = svc.fleet.get(cmd.instance_id)
    owner = owner_of(svc, inst)
    job.allow("autostop", owner_id=owner)
    old = store.get(inst.id)
    if cmd.minutes is None:
        store.delete(inst.id)
        text = f":zzz: <@{actor.user_id}> turned autostop off for *{inst.label}*; it runs until someone stops it."
        if old is not None and old.headsup_ts:
            _close_headsup(svc, old, text)
        svc.notifier.post(actor.channel_id, text)
    else:
        headsup = svc.settings.RUNCTL_AUTOSTOP_HEADSUP_MINUTES
        whom = f"<@{owner}>" if owner else "its owner"
        # rules.decide: the stop never comes sooner than the heads-up time after the heads-up.
        when = (
            f"with a heads-up to {whom} {headsup:g} min before"
            if cmd.minutes > headsup
            else f"after a heads-up to {whom}, sent once it is idle, and no sooner than {headsup:g} min after it"
        )
        text = (
            f":alarm_clock: <@{actor.user_id}> set autostop on *{inst.label}*: stopped after {cmd.minutes} min "
            f"with no live run (and idle GPUs where it has them), {when}. A live run is never interrupted."
        )
        thread = old.thread_ts if old else None
        channel = old.channel if old else actor.channel_id
        if thread is None:
            last = svc.runs.latest(inst.id)
            if last is not None and last.message_ts:
                channel, thread = last.channel_id, last.message_ts
        ts = svc.notifier.post(channel, text, thread_ts=thread)
        store.save(
            Setting(
                instance_id=inst.id,
                minutes=cmd.minutes,
                set_by=actor.user_id,
                channel=channel,
                thread_ts=thread or ts,
                owner=owner,
            )
        )
        if channel != actor.channel_id or thread:
            answer(svc, actor, text)
    return text


# --- the sweep's check ------------------------------------------------------------


def check(svc: Services, rows: list[Row], now: datetime) -> int:
    """Heads-ups and stops for instances with autostop; returns how many it acted on."""
    store = AutostopStore(svc.redis)
    settings = {s.instance_id: s for s in store.all()}
    if not settings:
        return 0
    minutes_before = svc.settings.RUNCTL_AUTOSTOP_HEADSUP_MINUTES
    by_id = {r.id: r for r in rows}
    verdicts: dict[str, Verdict] = {}
    for iid, setting in settings.items():
        row = by_id.get(iid)
        if row is None:
            continue
        idle = setting.idle_since(row.idle_since)
        verdicts[iid] = rules.decide(setting.minutes, minutes_before, idle, now, setting.headsup_at, setting.kept_until)
    busy = _busy_gpus(svc, [i for i, v in verdicts.items() if v in (Verdict.HEADS_UP, Verdict.STOP)])
    queues = QueueStore(svc.redis)
    busy |= {i for i in verdicts if queues.waiting(i)}  # a queue keeps it busy: autostop waits
    acted = 0
    for iid, verdict in verdicts.items():
        setting, row = settings[iid], by_id[iid]
        if iid in busy:
            setting.gpu_busy_at = now
            store.save(setting)
            verdict = rules.decide(
                setting.minutes,
                minutes_before,
                setting.idle_since(row.idle_since),
                now,
                setting.headsup_at,
                setting.kept_until,
            )
        if verdict is Verdict.RESET:
            _close_headsup(
                svc,
                setting,
                f":arrows_counterclockwise: *{row.instance.label}* is busy again; autostop waits until it is idle.",
            )
            setting.headsup_at, setting.headsup_ts = None, None
            store.save(setting)
        elif verdict is Verdict.HEADS_UP:
            _headsup(svc, setting, row, now)
            store.save(setting)
            acted += 1
        elif verdict is Verdict.STOP and store.claim_stop(iid):
            enqueue(svc.queue, JobPath.AUTOSTOP_STOP, InstanceArgs(instance_id=iid), SYSTEM)
            acted += 1
    return acted


def _busy_gpus(svc: Services, ids: list[str]) -> set[str]:
    """Instances whose busiest GPU is at or above RUNCTL_AUTOSTOP_GPU_PERCENT (nvidia-smi)."""
    if not ids:
        return set()
    try:
        results = svc.fleet.run_many(ids, gpu.utilization(svc.settings.RUNCTL_REMOTE_ROOT))
    except RunctlError as exc:
        log.warning("autostop: GPU probe failed (%s); deciding on runs alone", exc.what)
        return set()
    limit = svc.settings.RUNCTL_AUTOSTOP_GPU_PERCENT
    return {iid for iid, res in results.items() if (u := gpu.parse(res.stdout)) is not None and u >= limit}


def _headsup(svc: Services, setting: Setting, row: Row, now: datetime) -> None:
    idle = setting.idle_since(row.idle_since) or now
    due = rules.due_at(setting.minutes, idle, setting.kept_until)
    wait = max(due, now + timedelta(minutes=svc.settings.RUNCTL_AUTOSTOP_HEADSUP_MINUTES))
    mention = f"<@{setting.owner}>" if setting.owner else "Heads-up:"
    cost = row.cost_of((now - idle).total_seconds())
    spent = f" (${format_rate(cost.quantize(Decimal('0.01')))})" if cost is not None else ""
    text = (
        f":alarm_clock: {mention} *{row.instance.label}* has had no live run for "
        f"{duration((now - idle).total_seconds())}{spent}. Autostop stops it in "
        f"{duration((wait - now).total_seconds())} unless a run starts or you keep it."
    )
    body, blocks = headsup_blocks(text, setting.instance_id)
    setting.headsup_ts = svc.notifier.try_post(
        setting.channel, body, blocks, setting.thread_ts, what=f"the autostop heads-up for {setting.instance_id}"
    )
    setting.headsup_at = now


def _close_headsup(svc: Services, setting: Setting, text: str) -> None:
    if not setting.headsup_ts:
        return
    body, blocks = closed_blocks(text)
    svc.notifier.try_update(
        setting.channel, setting.headsup_ts, body, blocks, what=f"the autostop heads-up for {setting.instance_id}"
    )


@funnel.system("autostop")
def stop_idle(instance_id: str) -> str:
    """The sweep decided STOP: stop it unless a run started meanwhile."""
    svc = current()
    store = AutostopStore(svc.redis)
    setting = store.get(instance_id)
    try:
        if setting is None:
            return "autostop was turned off"
        before = svc.fleet.get(instance_id)
        cost = saving(svc, before)
        inst, why_not = _idle_stop(svc, instance_id, "stop")
        if inst is None:
            left = f":arrows_counterclockwise: Autostop left *{before.label}* running: {why_not}."
            _close_headsup(svc, setting, left)
            setting.headsup_at, setting.headsup_ts = None, None
            store.save(setting)
            return why_not
        text = (
            f":double_vertical_bar: Autostop stopped *{inst.label}* after {setting.minutes} min with no live run: "
            f"{cost}. `/runctl start {inst.id}` brings it back."
        )
        _close_headsup(svc, setting, text)
        owner = f"<@{setting.owner}> " if setting.owner else ""
        svc.notifier.post(setting.channel, owner + text, thread_ts=setting.thread_ts)
        setting.headsup_at, setting.headsup_ts, setting.kept_until = None, None, None
        store.save(setting)
        actor = Actor(user_id=setting.owner or "runctl", channel_id=setting.channel)
        audit.record(
            svc.redis,
            svc.settings.RUNCTL_AUDIT_MAXLEN,
            audit.of(actor, "allowed", "autostopped (idle)", instance=inst.id),
        )
        return text
    except RunctlError as exc:
        log.warning("autostop of %s: %s", instance_id, exc.what)
        return exc.what
    finally:
        store.release_stop(instance_id)


# --- the heads-up's buttons -------------------------------------------------------


@funnel.click("click keep running 1h", 1, "autostop")
def keep(job: Job, instance_id: str, message_ts: str) -> str:
    """[Keep running 1h] on an autostop heads-up (`keep(instance_id, actor, message_ts)`): it changes
    the instance's autostop, so it needs `autostop` against the instance's owner, as the command does."""
    svc, actor = job.svc, job.actor
    job.instance_id = instance_id
    job.allow("autostop", owner_id=policy.instance_owner(svc.redis, instance_id, lambda i: svc.fleet.get(i).tags))
    store = AutostopStore(svc.redis)
    setting = store.get(instance_id)
    if setting is None:
        text = f"Autostop is off for `{instance_id}`; nothing to keep."
        answer(svc, actor, text)
        return text
    setting.kept_until = svc.clock() + rules.KEEP
    setting.headsup_at = None
    text = (
        f":ok_hand: <@{actor.user_id}> keeps `{instance_id}` running for another hour; autostop asks again "
        "before it stops."
    )
    _close_headsup(svc, setting, text)
    setting.headsup_ts = None
    store.save(setting)
    return text


@funnel.click("click autostop stop now", 1, "stop")
def stop_now(job: Job, instance_id: str, message_ts: str) -> str:
    """[Stop now] on an autostop heads-up (`stop_now(instance_id, actor, message_ts)`)."""
    svc, actor = job.svc, job.actor
    job.instance_id = instance_id
    store = AutostopStore(svc.redis)
    setting = store.get(instance_id)
    thread = setting.thread_ts if setting else None
    job.thread_ts = thread
    outcome = stop_flow(svc, instance_id, actor, thread_ts=thread)
    if setting is not None:
        _close_headsup(svc, setting, f":double_vertical_bar: <@{actor.user_id}> clicked [Stop now]: {outcome}")
        setting.headsup_at, setting.headsup_ts, setting.kept_until = None, None, None
        store.save(setting)
    return outcome
