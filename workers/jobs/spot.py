"""`train --auto-resume`: after a spot interruption, back the run's checkpoints up to S3
from the interrupted instance (while it lasts), launch a replacement from the same preset
(the template's next subnet when a zone has no capacity) within the user's caps, and
resume the run there from its checkpoints. Queued by the monitor; once per run.

A stop-type interruption keeps the instance's EBS volume, and EC2 restarts the instance when
spot capacity returns ("Only Amazon EC2 can restart an interrupted stopped Spot Instance";
cancelling its request would terminate it: EC2 user guide, "Behavior of Spot Instance
interruptions"). So when EC2 stopped it before its checkpoints were all in S3, the run waits
for that restart (its request left open) and resumes there, from its own disk."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

from workers import policy
from workers.aws import backups, launcher
from workers.aws.instance import Instance
from workers.aws.launcher import Launcher
from workers.commands import Actor, LaunchCommand
from workers.errors import RunctlError
from workers.jobs import autostop, caps, funnel, spot_request
from workers.jobs.backup import backup_run
from workers.jobs.launch import resolve
from workers.jobs.resume import resume_run
from workers.queueing import SYSTEM, JobPath, RunArgs, enqueue
from workers.services import Services, current
from workers.slack.escape import code
from workers.slack.thread import reply
from workers.state.locks import Holder, operation
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger

CLAIM = "runctl:spot:replaced:"  # + run id: one replacement per interrupted run
BACKUP_LOCK_WAIT = 60.0  # seconds a backup waits for another operation on the instance
AWAIT = "runctl:spot:await-restart:"  # + run id -> the epoch second runctl stops waiting for EC2's restart
RESTART_POLL = timedelta(minutes=5)
RESTART_WAIT = timedelta(days=7)


class NotSaved(RunctlError):
    """The interrupted instance's checkpoints are not all in S3."""


@funnel.system("spot replacement")
def replace(run_id: str) -> str:
    svc = current()
    run = svc.runs.get(run_id)
    if run is None or not run.auto_resume or not run.spot_notice:
        return "nothing to replace"
    if svc.redis.exists(AWAIT + run_id):
        return on_restart(svc, run)
    if not svc.redis.set(CLAIM + run_id, "1", nx=True, ex=7 * 86400):
        return "already replaced"
    saved = False
    try:
        old = svc.fleet.get(run.instance_id)
        try:
            save_first(svc, run, old)
        except NotSaved as exc:
            if stopped_by_ec2(svc, run):  # its disk survives: wait for EC2 to bring it back
                return await_restart(svc, run, exc)
            if old.state == "running":
                raise
            # Terminated by EC2: what S3 holds is all there is.
        else:
            saved = True
            autostop.after_run(svc, run, backed_up=True)  # `--then` only once the checkpoints are in S3
        return continue_elsewhere(svc, run, old)
    except RunctlError as exc:
        return failed(svc, run, exc, saved)


def failed(svc: Services, run: Run, exc: RunctlError, saved: bool) -> str:
    """The thread hears why the run did not continue, and what `--then` left undone."""
    fix = f" Fix: {exc.fix}" if exc.fix else ""
    why = f" ({exc.why})" if exc.why else ""
    back = (
        f"\nIf EC2 stopped {run.instance_id} for the interruption, it restarts it when spot capacity returns, "
        f"and it bills from then: `/runctl terminate {run.instance_id}` once you no longer need its disk."
    )
    if not saved and run.then in ("stop", "terminate"):
        back += (
            f"\n`--then {run.then}` was not carried out: {run.instance_id}'s disk holds checkpoints "
            "that are not all in S3."
        )
    reply(svc, run, f":warning: run `{run.run_id}` was not resumed on a replacement: {exc.what}{why}{fix}{back}")
    return exc.what


def save_first(svc: Services, run: Run, old: Instance) -> None:
    """AWS takes the instance at the notice's time: back up what it holds first, under its
    operation lock, so no stop or terminate (`--then`, a person's) powers it off mid-upload.
    NotSaved when something is left only on its disk (the newest checkpoint runctl saw, if it
    is no longer running to ask)."""
    owner = run.checkpoint_run_id or run.run_id
    if old.state != "running":
        stored = backups.load_bound(svc.fleet, owner, svc.runs.get)
        newest = run.checkpoint.name if run.checkpoint else ""
        if newest and (stored is None or stored.find(newest) is None):
            raise NotSaved(f"{old.label} is `{old.state}`: checkpoint {code(newest)} of run `{owner}` is not in S3.")
        return
    doing = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=svc.clock(), operation="backup")
    try:
        with operation(svc.redis, old.id, doing, wait_seconds=BACKUP_LOCK_WAIT):
            saved = backup_run(svc, old, owner)
    except RunctlError as exc:  # EC2 took it mid-backup: the command failed with it
        raise NotSaved(exc.what, why=exc.why, fix=exc.fix) from exc
    if not saved.ok:
        raise NotSaved(f"The checkpoints of run `{owner}` could not all be backed up from {old.label}.")


def stopped_by_ec2(svc: Services, run: Run) -> bool:
    """A stop-type notice, and EC2 stopped (or is stopping) the instance: its disk survives."""
    try:
        action = json.loads(run.spot_notice).get("action")
        state = svc.fleet.get(run.instance_id).state
    except (ValueError, AttributeError, RunctlError):
        return False
    return action == "stop" and state in ("stopping", "stopped")


def await_restart(svc: Services, run: Run, exc: RunctlError) -> str:
    """Wait for EC2 to restart the stopped instance; `on_restart` resumes the run there."""
    until = svc.clock() + RESTART_WAIT
    svc.redis.set(AWAIT + run.run_id, str(int(until.timestamp())), ex=int(RESTART_WAIT.total_seconds()) + 86400)
    iid = run.instance_id
    reply(
        svc,
        run,
        f":hourglass_flowing_sand: run `{run.run_id}` waits for {iid}: EC2 stopped it for the spot interruption "
        f"before its checkpoints were all in S3 ({exc.what}), and its disk keeps them. EC2 restarts it when spot "
        "capacity returns (only EC2 can), and runctl then resumes the run there from its own disk; it checks every "
        f"{int(RESTART_POLL.total_seconds() // 60)} min until {until:%Y-%m-%d %H:%M} UTC. Its spot request stays "
        f"open for that: cancelling it would terminate the instance and its disk. `/runctl terminate {iid}` gives "
        "up the disk and the run.",
        mention=False,
    )
    enqueue(svc.queue, JobPath.SPOT_REPLACE, RunArgs(run_id=run.run_id), SYSTEM, delay=RESTART_POLL)
    return f"waiting for EC2 to restart {iid}"


def on_restart(svc: Services, run: Run) -> str:
    """The stop-interrupted instance is back (EC2 restarted it): resume the run there; still
    stopped: look again later, until the wait ends."""
    key = AWAIT + run.run_id
    raw = svc.redis.get(key)
    inst = svc.fleet.get(run.instance_id)
    if inst.state == "running":
        UptimeLedger(svc.redis).mark_running(inst.id, inst.launch_time or svc.clock())
        svc.fleet.wait_for_agent(inst)
        if not svc.redis.delete(key):
            return "already resumed"
        actor = Actor(user_id=run.user_id, channel_id=run.channel_id)
        note = f":zap: EC2 restarted {inst.label} after the spot interruption: the run continues from its own disk."
        done = resume_run(svc, run.run_id, actor, on=inst.id, note=note)
        reply(svc, run, done.text, mention=False)
        return f"resumed as {done.run.run_id} on {inst.id}"
    until = int(raw or 0)
    if inst.state in ("stopping", "stopped", "pending") and svc.clock().timestamp() < until:
        enqueue(svc.queue, JobPath.SPOT_REPLACE, RunArgs(run_id=run.run_id), SYSTEM, delay=RESTART_POLL)
        return f"{inst.id} is still {inst.state}"
    svc.redis.delete(key)
    why = "is `" + inst.state + "`" if inst.state not in ("stopping", "stopped") else "was not restarted in time"
    reply(
        svc,
        run,
        f":warning: run `{run.run_id}` was not resumed: {inst.label} {why}, and its checkpoints are not all in S3. "
        f"`/runctl resume {run.run_id}` once it runs again, or `/runctl terminate {inst.id}` to give up its disk.",
    )
    return f"gave up waiting for {inst.id}"


def continue_elsewhere(svc: Services, run: Run, old: Instance) -> str:
    preset = old.tags.get(launcher.PRESET_TAG)
    if not preset:
        raise RunctlError(
            f"{old.label} was not launched from a preset, so there is nothing to launch its replacement from.",
            fix=f"`/runctl launch <preset> --spot`, then `/runctl resume {run.run_id} --on <new instance>`.",
        )
    actor = Actor(user_id=run.user_id, channel_id=run.channel_id)
    config = launcher.load(svc.settings.RUNCTL_LAUNCH_FILE)
    spec = resolve(svc, config, LaunchCommand(target=preset, spot=old.lifecycle == "spot"), actor)
    # The interrupted instance counts while it runs: the notice is the instance's word, and a
    # stop-interrupted spot instance comes back by itself when capacity returns.
    ask = caps.Ask(
        what="Replacement launch",
        user_id=run.user_id,
        price=caps.quote(svc, config, spec),
        disk_gb=spec.disk_gb,
        disk_default=caps.default_disk(config, spec),
        region=spec.region,
        fix=f"Once {old.id} is stopped or terminated (`/runctl terminate {old.id}` gives up its disk), "
        f"`/runctl launch {preset}{' --spot' if spec.spot else ''}`, then `/runctl resume {run.run_id} --on "
        f"<new instance>`; or resume it on an instance you have: `/runctl resume {run.run_id} --on <instance>`; "
        "or ask an admin to raise `[limits]` in the launch file.",
    )
    with caps.admit(svc, config, ask):
        token = f"spot-{run.run_id}-{secrets.token_hex(4)}"[:64]
        iid = Launcher(svc.fleet).run(config.template, spec, run.user_id, token, policy.scope(svc.settings))
    reply(
        svc,
        run,
        f":zap: spot interruption of {old.label}: launched `{iid}` from preset {code(preset)} "
        "to continue the run; waiting for it to be ready…",
        mention=False,
    )
    settings = svc.settings
    Launcher(svc.fleet).wait_running(iid, settings.RUNCTL_LAUNCH_POLL_SECONDS, settings.RUNCTL_PENDING_WAIT_SECONDS)
    inst = svc.fleet.get(iid)
    UptimeLedger(svc.redis).mark_running(iid, inst.launch_time or svc.clock())
    svc.fleet.wait_for_agent(inst)
    done = resume_run(
        svc, run.run_id, actor, on=iid, note=f":zap: After a spot interruption of {old.label} (`--auto-resume`)."
    )
    reply(svc, run, done.text, mention=False)
    left = spot_request.after_interruption(svc, old)
    if left:
        reply(svc, run, left, mention=False)
    return f"resumed as {done.run.run_id} on {iid}"
