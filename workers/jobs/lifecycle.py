"""Instance lifecycle: stop (checkpoint first), start (offer to resume) and
terminate (only through a confirmation button).

Every flow holds the per-instance operation lock, so it never interleaves with a
train launch or another lifecycle operation on the same instance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from workers import policy, remote
from workers.aws import backups
from workers.aws.fleet import Instance, ScriptResult
from workers.commands import Actor, StartCommand, StopCommand, TerminateCommand, TrainCommand
from workers.cost.pricing import cost_of, format_usd, hourly_price, load_price_book
from workers.errors import AgentOffline, RemoteError, RunctlError, WrongState
from workers.jobs import funnel
from workers.jobs.backup import backup_runs
from workers.jobs.caps import admit_start
from workers.jobs.confirm import ConfirmClick, answer
from workers.jobs.funnel import Job
from workers.jobs.launch import LaunchClick
from workers.queueing import enqueue_command
from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint, discover, discover_all
from workers.remote.lifecycle import StopResult, parse_stop
from workers.services import Services
from workers.slack.escape import code
from workers.slack.format import duration, size
from workers.slack.ids import ActionId
from workers.slack.messages.lifecycle import (
    Cost,
    checkpoint_line,
    checkpoints_summary,
    closed_blocks,
    confirmation_blocks,
    ready_blocks,
    summary_blocks,
)
from workers.slack.thread import publish, reply
from workers.state.confirmations import Confirmation, ConfirmStore, Shown, new_nonce
from workers.state.locks import Holder, operation, train_lock
from workers.state.runs import Checkpoint, Run, RunState, new_run, new_run_id
from workers.state.uptime import UptimeLedger

log = logging.getLogger(__name__)

STOPPED_WAIT_SECONDS = 600
TERMINATED_WAIT_SECONDS = 120
RESUME_CLAIM_SECONDS = 7 * 86400


# --- job entry points ---------------------------------------------------------------


@funnel.command(StopCommand)
def stop(job: Job, cmd: StopCommand) -> str:
    return stop_flow(job.svc, cmd.instance_id, job.actor, cmd.grace, cmd.force)


@funnel.command(StartCommand)
def start(job: Job, cmd: StartCommand) -> str:
    return start_flow(job.svc, cmd.instance_id, job.actor, cmd.wait)


@funnel.command(TerminateCommand)
def terminate(job: Job, cmd: TerminateCommand) -> str:
    return ask_to_terminate(job.svc, cmd.instance_id, job.actor)


@funnel.click("click confirmation", 2)
def confirm_click(job: Job, action: str, nonce: str, message_ts: str) -> str:
    """A click on a terminate confirmation's button: [Terminate], [Stop instead], [Cancel]
    (`confirm_click(action, nonce, actor, message_ts)`). Launch clicks have their own path
    (`launch.confirm_click`); those queued here by the release before it still work here."""
    kind = LaunchClick if ActionId(action) in LaunchClick.ACTIONS else TerminateClick
    return kind(job, ActionId(action), nonce, message_ts).handle()


@funnel.click("click resume training", 1, "train")
def resume(job: Job, run_id: str, message_ts: str) -> str:
    """[Resume training] (`resume(run_id, actor, message_ts)`)."""
    return resume_flow(job.svc, run_id, job.actor, message_ts)


# --- replies ----------------------------------------------------------------------


def holder(svc: Services, actor: Actor, what: str) -> Holder:
    return Holder(run_id="-", user_id=actor.user_id, since=svc.clock(), operation=what)


# --- cost ------------------------------------------------------------------------


def session_cost(svc: Services, inst: Instance, until: datetime) -> Cost:
    """Uptime since the last start (LaunchTime) and its cost where a price is known."""
    seconds = (until - inst.launch_time).total_seconds() if inst.launch_time else None
    lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
    price = hourly_price(
        load_price_book(), svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle
    )
    rate = price.usd_per_hour
    amount = None if seconds is None else cost_of(rate, seconds)
    return Cost(seconds, format_usd(amount), price.describe())


# --- halting runs (shared by stop and terminate) -----------------------------------


@dataclass
class Halt:
    run_id: str
    run: Run | None
    result: StopResult
    listing: CheckpointListing | None
    report: str

    @property
    def saved(self) -> FoundCheckpoint | None:
        return _saved_since_signal(self.listing, self.result)


def _saved_since_signal(listing: CheckpointListing | None, result: StopResult) -> FoundCheckpoint | None:
    if listing is None:
        return None
    fresh = [c for c in listing.checkpoints if c.name in result.saved]
    return max(fresh, key=lambda c: (c.epoch or 0, c.modified_at), default=None)


def _newest(listing: CheckpointListing | None) -> FoundCheckpoint | None:
    if listing is None:
        return None
    return listing.newest_valid or listing.newest


def unconfirmed(result: ScriptResult, label: str, instance_id: str, what: str) -> RunctlError:
    """A script that did not report: the agent never took it, or it did not finish. Either way
    nothing tells whether the training is alive, so callers must not go on as if it were not."""
    status = f"{result.status}/{result.details}" if result.details else result.status
    if not result.delivered:
        return AgentOffline(
            f"The SSM agent on {label} did not take the command to {what} ({status}).",
            why="The agent is offline or lost its connection, so the training got no SIGTERM and "
            "nothing could tell whether it is alive.",
            fix="Check `sudo systemctl status amazon-ssm-agent` on the instance and its instance profile "
            "(AmazonSSMManagedInstanceCore), then retry.",
        )
    return RemoteError(
        f"The command to {what} on {label} did not finish ({status}, exit {result.exit_code}).",
        why="runctl can't tell whether the training saved a checkpoint or is still alive.",
        fix=f"`/runctl status {instance_id}`, then retry.",
        detail=(result.stderr or result.stdout).strip()[-1500:],
    )


def _already_saved(newest: FoundCheckpoint | None, finished: int | None) -> str:
    """When the newest checkpoint holds the last finished epoch, what a stop costs (only the
    epoch in progress); "" when that is not known to be so (then progress may be lost)."""
    if newest is None or newest.epoch is None or finished is None or newest.epoch < finished:
        return ""
    return (
        f"the newest checkpoint (epoch {newest.epoch}, {code(newest.name)}) was already saved; "
        f"the partial epoch {newest.epoch + 1} is discarded"
    )


class Halter:
    """Stops the training runs alive on an instance, each given SIGTERM and `grace` seconds."""

    def __init__(
        self, svc: Services, inst: Instance, actor: Actor, grace: int, force: bool,
        why: Literal["stop", "terminate"],
    ) -> None:
        self.svc = svc
        self.inst = inst
        self.actor = actor
        self.grace = grace
        self.force = force
        self.why = why  # recorded as the run's ended_by
        self.root = svc.settings.RUNCTL_REMOTE_ROOT

    def live_run_ids(self, known: Run | None) -> list[str]:
        """Runs alive on the instance (its pid files are the truth) plus the one Redis knows."""
        ids = [known.run_id] if known else []
        result = self.svc.fleet.run(self.inst.id, remote.probe_live_runs(self.root))
        if not result.ok:
            raise self.unconfirmed(result, "look for live trainings")
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "live" and parts[1] not in ids:
                ids.append(parts[1])
        return ids

    def halt_all(self, known: Run | None) -> list[Halt]:
        return [self.halt(run_id) for run_id in self.live_run_ids(known)]

    def halt(self, run_id: str) -> Halt:
        svc = self.svc
        run = svc.runs.get(run_id)
        if run is not None and not run.state.ended:
            run.state = RunState.STOPPING
            publish(svc, run)
            verb = "Killing it at once (`--force`)" if self.force else f"SIGTERM, up to {self.grace} s to save"
            reply(svc, run, f"<@{self.actor.user_id}> is {self._doing()} {self.inst.label}. {verb}.", mention=False)
        ck_dir = (run.checkpoint_run_id or run_id) if run else run_id
        script = remote.stop_run(self.root, run_id, self.grace, force=self.force, checkpoint_run_id=ck_dir)
        out = svc.fleet.run(self.inst.id, script, timeout=self.grace + 60)
        parsed = parse_stop(out.stdout)
        if parsed is None:  # never "nothing was alive": the script did not say so
            raise self.unconfirmed(out, f"signal run `{run_id}`")
        result = parsed
        listing: CheckpointListing | None
        try:
            listing = discover(svc.fleet, self.root, self.inst.id, ck_dir)
        except RunctlError as exc:
            log.warning("checkpoint discovery on %s: %s", self.inst.id, exc.what)
            listing = None
        script_name = code(run.script) if run else f"run {code(run_id)}"
        halt = Halt(run_id, run, result, listing, "")
        halt.report = self.report(script_name, halt) + inventory(listing)
        if run is not None:
            self.close(run, halt)
        return halt

    def unconfirmed(self, result: ScriptResult, what: str) -> RunctlError:
        return unconfirmed(result, self.inst.label, self.inst.id, what)

    def _doing(self) -> str:
        return "terminating" if self.why == "terminate" else "stopping"

    def report(self, script: str, halt: Halt) -> str:
        now = self.svc.clock()
        result, saved, newest = halt.result, halt.saved, _newest(halt.listing)
        if result.how == "none":
            return f"Run {code(halt.run_id)}: no training process was alive any more."
        lost = (
            f"progress since epoch {newest.epoch} (the newest checkpoint, {code(newest.name)}, "
            f"{duration((now - newest.modified_at).total_seconds())} ago) is lost"
            if newest is not None and newest.epoch is not None
            else f"progress since {checkpoint_line(newest, now)} is lost"
            if newest is not None
            else "all its progress is lost: it has no checkpoint at all"
        )
        if halt.listing is None:
            lost = "runctl could not list its checkpoints to tell what was saved"
        kept = _already_saved(newest, result.finished_epoch)
        if self.force:
            if kept:
                return f":octagonal_sign: `--force`: {script} was killed at once (SIGKILL); {kept}."
            return (
                f":rotating_light: `--force`: {script} was killed at once (SIGKILL), without a chance "
                f"to save; {lost}."
            )
        saved_text = f"saved {checkpoint_line(saved, now)}" if saved else ""
        if result.how == "kill":
            head = (
                f":rotating_light: *{script} did not exit within {self.grace} s of SIGTERM, so runctl "
                "killed it (SIGKILL).*"
            )
            if saved:
                return f"{head} Before that it {saved_text}; anything after that checkpoint is lost."
            if kept:
                return f"{head} Nothing is lost: {kept}. Make it exit promptly on SIGTERM."
            return (
                f"{head} It wrote no checkpoint after the signal; {lost}. Make it exit after saving on "
                "SIGTERM, or allow more time with `--grace SECONDS`."
            )
        if saved:
            return f":floppy_disk: {script} {saved_text} on SIGTERM and exited after {result.waited} s."
        if kept:
            return f":floppy_disk: {script} exited {result.waited} s after SIGTERM; {kept}."
        return (
            f":rotating_light: *{script} wrote no checkpoint on SIGTERM; {lost}.* It has no SIGTERM "
            "handler that saves: catch SIGTERM (`signal.signal(signal.SIGTERM, ...)`), write a checkpoint "
            "to `$RUNCTL_CHECKPOINT_DIR`, then exit."
        )

    def close(self, run: Run, halt: Halt) -> None:
        """The run ended here: record it, release its lock, close its parent message."""
        svc = self.svc
        found = halt.saved or _newest(halt.listing)
        if found is not None and not found.is_dir:
            run.checkpoint = Checkpoint(
                name=found.name, size=found.size, modified_at=found.modified_at, epoch=found.epoch
            )
        run.state = RunState.STOPPED
        run.ended_by = "force" if self.force else self.why
        run.ended_at = svc.clock()
        if halt.result.how == "kill":
            run.exit_code = 137
        run.stopped_by = self.actor.user_id  # the final parent says who, in the past tense
        release_train_lock(svc, run.instance_id, run.run_id)
        publish(svc, run)
        reply(svc, run, halt.report, full_log=run.started_at is not None)


def inventory(listing: CheckpointListing | None) -> str:
    """How many checkpoints the run has in all, wherever it saved them."""
    if listing is None or not listing.checkpoints:
        return ""
    n = len(listing.checkpoints) + listing.omitted
    shown = " shown" if listing.omitted else ""
    return f" The run has {n} checkpoint{'s' if n != 1 else ''} ({size(listing.total_size)}{shown})."


def release_train_lock(svc: Services, instance_id: str, run_id: str) -> None:
    lock = train_lock(svc.redis, instance_id)
    held = lock.holder()
    raw = lock.raw()
    if held is not None and held.run_id == run_id and raw is not None:
        lock.release(raw)


# --- stop ------------------------------------------------------------------------


def stop_flow(
    svc: Services,
    instance_id: str,
    actor: Actor,
    grace: int | None = None,
    force: bool = False,
    thread_ts: str | None = None,
) -> str:
    """Checkpoint and stop the live run, stop the instance, post the summary (in `thread_ts`
    when given); returns the outcome in a line. Raises RunctlError when the stop did not happen."""
    with operation(svc.redis, instance_id, holder(svc, actor, "stop")):
        done, lines = _stop_locked(svc, instance_id, actor, grace, force)
    if not done:
        answer(svc, actor, lines[0], thread_ts)
        return lines[0]
    text, blocks = summary_blocks(lines)
    svc.notifier.try_post(actor.channel_id, text, blocks, thread_ts, what="the stop summary")
    return lines[0]


def _stop_locked(
    svc: Services, iid: str, actor: Actor, grace: int | None, force: bool
) -> tuple[bool, list[str]]:
    """(True, summary paragraphs) once stopped; (False, [reason]) when nothing was done."""
    fleet = svc.fleet
    inst = fleet.get(iid)
    policy.check(svc.settings, actor.user_id, "stop", policy.instance_owner(svc.redis, iid, lambda _: inst.tags))
    if inst.state == "stopping":
        return False, [f"{inst.label} is already stopping. `/runctl status {iid}` shows when it is stopped."]
    if inst.state == "stopped":
        return False, [f"{inst.label} is already stopped; nothing to do. `/runctl start {iid}` starts it."]
    if inst.state in ("terminated", "shutting-down"):
        raise WrongState(f"{inst.label} is {inst.state}; it cannot be stopped.", state=inst.state,
                         fix="/runctl resources")
    if inst.state == "pending":
        inst = fleet.wait_for_state(iid, ("running",), svc.settings.RUNCTL_PENDING_WAIT_SECONDS)
    known = svc.runs.live_on(iid)
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
    fleet.stop(iid)
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
        lines.append("No training was running." if not force or known is None
                     else "The instance was unreachable, so its training was not signalled.")
    lines.append(cost.text("Up this session"))
    if inst.lifecycle == "spot":
        lines.append(
            f":information_source: A persistent spot request's instance: its request is `disabled` while "
            f"stopped, and `/runctl start {iid}` starts it again when spot capacity allows."
        )
    return True, lines


# --- start -----------------------------------------------------------------------


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
    claimed = svc.redis.set(f"runctl:resume:{run_id}", f"{new_id} {actor.user_id}", nx=True,
                            ex=RESUME_CLAIM_SECONDS)
    if not claimed:
        raw = svc.redis.get(f"runctl:resume:{run_id}")
        prior = (raw.decode() if isinstance(raw, bytes) else str(raw or "")).split()
        by = f" by <@{prior[1]}> as run `{prior[0]}`" if len(prior) == 2 else ""
        text = f"Run `{run_id}` was already resumed{by}."
        answer(svc, actor, text)
        return text
    cmd = TrainCommand.from_run(old)
    run = new_run(svc, cmd, actor, new_id).model_copy(update={
        "channel_id": old.channel_id,
        "checkpoint_run_id": old.checkpoint_run_id or old.run_id,
        "notes": [f":repeat: Resumes run `{old.run_id}` from its checkpoint directory."],
    })
    svc.runs.create(run)
    enqueue_command(svc.queue, cmd, actor, run.run_id)
    text, blocks = closed_blocks(
        f":repeat: <@{actor.user_id}> resumed run `{old.run_id}` as run `{run.run_id}` on "
        f"`{old.instance_id}`; it continues from its last checkpoint."
    )
    svc.notifier.try_update(actor.channel_id, message_ts, text, blocks, what="the start report")
    return text


# --- terminate -------------------------------------------------------------------


def ask_to_terminate(svc: Services, iid: str, actor: Actor) -> str:
    """Post the confirmation in the channel; nothing touches the instance until a click."""
    inst = svc.fleet.get(iid)
    if inst.state in ("terminated", "shutting-down"):
        text = f"{inst.label} is already `{inst.state}`; there is nothing to terminate."
        answer(svc, actor, text)
        return text
    now = svc.clock()
    live, listings, note, shown = what_would_be_lost(svc, inst)
    risky = at_risk(svc, listings)
    conf = Confirmation(nonce=new_nonce(), instance_id=iid, requester_id=actor.user_id, channel_id=actor.channel_id,
                        created_at=now, shown=shown)
    text, blocks = confirmation_blocks(
        inst,
        session_cost(svc, inst, now) if inst.state == "running" else Cost(None, "", ""),
        live,
        checkpoints_summary(listings, now, note, risky),
        conf.nonce,
        actor.user_id,
        conf.expires_at,
        now,
        without_backup=risky is not None and any(risky.values()),
    )
    conf.message_ts = svc.notifier.post(actor.channel_id, text, blocks)
    ConfirmStore(svc.redis).save(conf)
    return text


def what_would_be_lost(
    svc: Services, inst: Instance
) -> tuple[Run | None, list[CheckpointListing] | None, str, Shown]:
    """The live run and the checkpoints a terminate would destroy, and their summary for a re-check."""
    listings: list[CheckpointListing] | None = None
    note = ""
    if inst.state == "running":
        try:
            listings = discover_all(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, inst.id)
        except RunctlError as exc:
            note = exc.what
    else:
        note = f"the instance is `{inst.state}`, so runctl can't look; anything on its root volume is deleted"
    live = svc.runs.live_on(inst.id)
    runs = None if listings is None else tuple(sorted(ls.run_id or "" for ls in listings if ls.checkpoints))
    return live, listings, note, Shown(state=inst.state, live_run_id=live.run_id if live else None,
                                       checkpoint_runs=runs)


def at_risk(
    svc: Services, listings: list[CheckpointListing] | None
) -> dict[str, list[FoundCheckpoint]] | None:
    """By run, the listed checkpoints a terminate would lose: those not in S3 as they are on
    the disk. None when S3 could not be asked (then every one counts as lost)."""
    if listings is None:
        return None
    risky: dict[str, list[FoundCheckpoint]] = {}
    try:
        for ls in listings:
            if ls.run_id and ls.checkpoints:
                stored = backups.load_bound(svc.fleet, ls.run_id, svc.runs.get)
                risky[ls.run_id] = [c for c in ls.checkpoints if stored is None or not stored.holds(c)]
    except RunctlError as exc:
        log.warning("could not read the S3 backups: %s", exc.what)
        return None
    return risky


class TerminateClick(ConfirmClick):
    """[Terminate], [Terminate without backup], [Stop instead], [Cancel] on a terminate confirmation."""

    def handle(self) -> str:
        mention = f"<@{self.actor.user_id}>"
        label = {
            ActionId.TERMINATE_CONFIRM: "Terminate",
            ActionId.TERMINATE_NO_BACKUP: "Terminate without backup",
            ActionId.TERMINATE_STOP_INSTEAD: "Stop instead",
            ActionId.TERMINATE_CANCEL: "Cancel",
        }.get(self.action, self.action.value)
        destroys = self.action if self.action is ActionId.TERMINATE_NO_BACKUP else ActionId.TERMINATE_CONFIRM
        conf = self.claim(label, destroys, "terminate")
        if conf is None:
            return self.too_late()
        if self.action is ActionId.TERMINATE_CANCEL:
            return self.show(conf, f":x: Terminate of `{conf.instance_id}` cancelled by {mention}.")
        if self.action is ActionId.TERMINATE_STOP_INSTEAD:
            self.show(conf, f":octagonal_sign: {mention} chose to stop `{conf.instance_id}` instead. Stopping…")
            try:
                outcome = stop_flow(self.svc, conf.instance_id, self.actor, thread_ts=conf.message_ts)
            except RunctlError as exc:
                self.show(conf, f":octagonal_sign: {mention} chose to stop instead of terminating: it did not happen: "
                          f"{exc.what}")
                raise
            return self.show(conf, f":octagonal_sign: {mention} chose to stop instead of terminating: {outcome}")
        backup = self.action is ActionId.TERMINATE_CONFIRM
        doing = "backing up its checkpoints, then terminating" if backup else "terminating without backup"
        self.show(conf, f":hourglass_flowing_sand: {mention} confirmed: {doing} `{conf.instance_id}`…")
        try:
            with operation(self.svc.redis, conf.instance_id, holder(self.svc, self.actor, "terminate")):
                text, changed = self.terminate(conf, backup)
        except RunctlError as exc:
            self.show(conf, f":warning: Terminate of `{conf.instance_id}` did not happen: {exc.what}")
            raise
        self.show(conf, text)
        if changed:
            self.store.settle(self.nonce, "it was out of date; a fresh confirmation was posted")
            requester = self.actor.model_copy(update={"channel_id": conf.channel_id})
            ask_to_terminate(self.svc, conf.instance_id, requester)
        return text

    def terminate(self, conf: Confirmation, backup: bool = True) -> tuple[str, bool]:
        """What happened, and whether a fresh confirmation must be asked (what it showed changed,
        or the backup failed). `backup`: copy the checkpoints S3 lacks there first."""
        svc = self.svc
        iid = conf.instance_id
        inst = svc.fleet.get(iid)
        if inst.state in ("terminated", "shutting-down"):
            return f"{inst.label} is already `{inst.state}`; nothing was done.", False
        if inst.state == "stopping":
            return (f"{inst.label} is `stopping` (someone is stopping it); nothing was terminated. "
                    f"Run `/runctl terminate {iid}` again once it is stopped."), False
        if conf.shown is not None:
            changes = conf.shown.changes(what_would_be_lost(svc, inst)[3])
            if changes:
                return (f":arrows_counterclockwise: Nothing was terminated: since this was asked, "
                        f"{'; '.join(changes)}. A fresh confirmation with what would be lost now follows."), True
        now = svc.clock()
        cost = session_cost(svc, inst, now) if inst.state == "running" else None
        reports: list[str] = []
        if inst.state == "running":
            known = svc.runs.live_on(iid)
            halter = Halter(svc, inst, self.actor, svc.settings.RUNCTL_STOP_GRACE_SECONDS, False, "terminate")
            try:
                reports = [h.report for h in halter.halt_all(known)]
            except AgentOffline as exc:
                reports = [f":warning: Could not reach the instance to let a training save first ({exc.what})."]
        if backup and inst.state == "running":
            saved, ok = self.back_up(inst)
            if not ok:
                return (f":warning: Nothing was terminated: the backup did not complete, so terminating would lose "
                        f"checkpoints. {saved}\nA fresh confirmation follows: [Terminate] tries the backup again, "
                        "[Terminate without backup] terminates anyway.\n" + "\n".join(reports)).strip(), True
            if saved:
                reports.append(saved)
        svc.fleet.terminate(iid)
        inst = svc.fleet.wait_for_state(iid, ("shutting-down", "terminated"), TERMINATED_WAIT_SECONDS)
        UptimeLedger(svc.redis).observe(iid, "terminated", None, now)
        asked = f" (asked by <@{conf.requester_id}>)" if conf.requester_id != self.actor.user_id else ""
        lines = [f":wastebasket: *{inst.label}* terminated by <@{self.actor.user_id}>{asked}; it is `{inst.state}`."]
        lines += reports
        if cost is not None:
            lines.append(cost.text("Up this session"))
        return "\n".join(lines), False

    def back_up(self, inst: Instance) -> tuple[str, bool]:
        """Back up what would be lost (after the halts, so a final checkpoint is among it)."""
        svc = self.svc
        try:
            listings = discover_all(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, inst.id)
            risky = at_risk(svc, listings) or {ls.run_id or "": ls.checkpoints for ls in listings}
            runs = [rid for rid, cks in risky.items() if rid and cks]
            if not runs:
                return "", True
            outcome = backup_runs(svc, inst, runs)
        except RunctlError as exc:
            return f"The backup failed: {exc.what}", False
        # What S3 cannot take (too big, a directory) the confirmation said would be lost; a failed upload was not.
        done = all(not r.failed for r in outcome.runs)
        return f":cloud: Backup: {outcome.text(svc.settings.RUNCTL_S3_BUCKET or '')}", done
