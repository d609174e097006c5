"""`/runctl resume <run-id> [--on <instance-id>]`: the run's command again (same script,
commit and arguments) on the same or another instance, continuing from its checkpoints.
Those the target's disk lacks come from the run's S3 backup, sha256-verified there before
the script starts (the train flow does that, `TrainFlow.restore_body`).

`resume_run` is the reusable flow (a spot interruption's auto-resume calls it too)."""

from __future__ import annotations

from dataclasses import dataclass

from workers import policy
from workers.aws import backups
from workers.commands import Actor, ResumeCommand, TrainCommand
from workers.errors import RunctlError
from workers.jobs import funnel
from workers.jobs.funnel import Job
from workers.jobs.preflight import Refusals, require_running
from workers.queueing import enqueue_command
from workers.services import Services
from workers.slack.escape import code
from workers.slack.format import size
from workers.state.runs import Run, new_run, new_run_id


@dataclass(frozen=True)
class Resumed:
    run: Run  # the new run, queued
    text: str


@funnel.command(ResumeCommand)
def resume(job: Job, cmd: ResumeCommand) -> str:
    if cmd.instance_id is not None:  # check the target first, announce after (issue 31)
        iid = cmd.instance_id
        require_running(
            job.svc.fleet.get(iid),
            Refusals(
                stopped=".",
                stopped_why="A resumed run trains there, so it needs to be running.",
                stopped_fix=f"/runctl start {iid}",
                gone="; it cannot run anything again.",
                gone_fix="/runctl resources",
            ),
            wait_pending=True,
        )
    done = resume_run(job.svc, cmd.run_id, job.actor, on=cmd.instance_id)
    job.tell(done.text)
    return done.text


def resume_run(svc: Services, run_id: str, actor: Actor, on: str | None = None, note: str = "") -> Resumed:
    """Queue a train of `run_id`'s exact command on `on` (default: its own instance) in the
    directory of the run that owns its checkpoints, restoring them from S3 first when a
    backup exists. Raises RunctlError when the run is unknown or could not continue anywhere."""
    old = svc.runs.get(run_id)
    if old is None:
        raise RunctlError(
            f"Run {code(run_id)} is not known to runctl.",
            why="Run records are kept in Redis; this one is not there (a typo, or it expired).",
            fix="`/runctl checkpoints <instance-id>` lists the runs an instance has.",
        )
    # It writes into the run's checkpoint directory: that run's owner's, or an admin's.
    policy.check(svc.settings, actor.user_id, "resume", old.user_id)
    owner = old.checkpoint_run_id or old.run_id
    if old.nodes and on is not None and on != old.instance_id:
        raise RunctlError(
            f"Run {code(run_id)} ran on {len(old.nodes)} nodes; it resumes on the same nodes only.",
            why="Rank 0's checkpoints are on node 0's disk; resuming on a new node set is not supported yet.",
            fix=f"`/runctl resume {run_id}`",
        )
    target = on or old.instance_id
    # Only what runctl's records bind to the run and the instance it came from (TrainFlow.restore_body).
    found = backups.restorable(backups.load(svc.fleet, owner), owner, svc.runs.get)
    if target != old.instance_id and not found.files:
        refused = (
            f" S3 holds {len(found.foreign)} file{'s' if len(found.foreign) != 1 else ''} under its prefix that "
            "did not come from its own instance; runctl restores none of them."
            if found.foreign
            else ""
        )
        raise RunctlError(
            f"Run {code(run_id)} has no checkpoints in S3, so it cannot continue on `{target}`.",
            why=f"Its checkpoints are only on `{old.instance_id}`'s disk.{refused}",
            fix=f"`/runctl backup {old.instance_id} --run {owner}` first (while that instance exists), "
            f"or `/runctl resume {run_id}` on its own instance.",
        )
    cmd = TrainCommand.from_run(old).model_copy(update={"instance_id": target, "ref": old.sha or old.ref})
    where = "" if target == old.instance_id else f" on `{target}`"
    notes = [f":repeat: Resumes run `{old.run_id}`{where} from its checkpoints."] + ([note] if note else [])
    if found.files:
        notes.append(
            f":cloud: Its S3 backup ({len(found.files)} files, {size(sum(f.size for f in found.files))}) fills in what "
            "this instance's disk lacks, each file's sha256 verified before the script starts."
        )
    new_id = new_run_id(svc.clock())
    run = new_run(svc, cmd, actor, new_id).model_copy(
        update={
            "channel_id": actor.channel_id or old.channel_id,
            "checkpoint_run_id": owner,
            # With refused files only, the train flow restores nothing and says what it refused.
            "restore_from": owner if found.files or found.foreign else None,
            "notes": notes,
        }
    )
    svc.runs.create(run)
    enqueue_command(svc.queue, cmd, actor, run.run_id)
    text = (
        f":repeat: <@{actor.user_id}> resumes run `{old.run_id}` as run `{run.run_id}` on `{target}` "
        f"({code(old.script)} at {code(cmd.ref or old.ref)}); it continues from its newest checkpoint."
    )
    return Resumed(run, text)
