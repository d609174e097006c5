"""`train --auto-resume`: after a spot interruption, back the run's checkpoints up to S3
from the interrupted instance (while it lasts), launch a replacement from the same preset
(the template's next subnet when a zone has no capacity) within the user's caps, and
resume the run there from its checkpoints. Queued by the monitor; once per run."""

from __future__ import annotations

import secrets

from workers import policy
from workers.aws import launcher
from workers.aws.instance import Instance
from workers.aws.launcher import Launcher
from workers.commands import Actor, LaunchCommand
from workers.errors import RunctlError
from workers.jobs import autostop, caps, funnel, spot_request
from workers.jobs.backup import backup_run
from workers.jobs.launch import resolve
from workers.jobs.resume import resume_run
from workers.services import Services, current
from workers.slack.escape import code
from workers.slack.thread import reply
from workers.state.locks import Holder, operation
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger

CLAIM = "runctl:spot:replaced:"  # + run id: one replacement per interrupted run
BACKUP_LOCK_WAIT = 60.0  # seconds a backup waits for another operation on the instance


@funnel.system("spot replacement")
def replace(run_id: str) -> str:
    svc = current()
    run = svc.runs.get(run_id)
    if run is None or not run.auto_resume or not run.spot_notice:
        return "nothing to replace"
    if not svc.redis.set(CLAIM + run_id, "1", nx=True, ex=7 * 86400):
        return "already replaced"
    saved = False
    try:
        old = svc.fleet.get(run.instance_id)
        save_first(svc, run, old)
        saved = True
        autostop.after_run(svc, run, backed_up=True)  # `--then` only once the checkpoints are in S3
        return continue_elsewhere(svc, run, old)
    except RunctlError as exc:
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
    operation lock, so no stop or terminate (`--then`, a person's) powers it off mid-upload."""
    if old.state != "running":
        return
    owner = run.checkpoint_run_id or run.run_id
    doing = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=svc.clock(), operation="backup")
    with operation(svc.redis, old.id, doing, wait_seconds=BACKUP_LOCK_WAIT):
        saved = backup_run(svc, old, owner)
    if not saved.ok:
        raise RunctlError(f"The checkpoints of run `{owner}` could not all be backed up from {old.label}.")


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
