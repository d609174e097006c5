"""`/runctl checkpoints <instance-id> [--run RUN_ID]`: a run's checkpoints on the
instance with an integrity check, as an ephemeral reply."""

from __future__ import annotations

import logging

from workers.aws import backups
from workers.aws.instance import Instance
from workers.commands import CheckpointsCommand
from workers.errors import RunctlError
from workers.jobs import funnel
from workers.jobs.funnel import Job
from workers.jobs.preflight import Refusals, require_running
from workers.remote.checkpoints import discover
from workers.services import Services
from workers.slack.messages.checkpoints import listing_message

log = logging.getLogger(__name__)


@funnel.command(CheckpointsCommand)
def checkpoints(job: Job, cmd: CheckpointsCommand) -> str:
    svc = job.svc
    inst = reachable(svc, cmd.instance_id)
    listing = discover(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, cmd.instance_id, cmd.run_id)
    try:
        stored = (
            backups.load_bound(svc.fleet, listing.run_id, svc.runs.get)
            if listing.run_id and not listing.missing
            else None
        )
    except RunctlError as exc:  # S3 unreadable: the listing stands without it
        log.warning("could not read the S3 backup of %s: %s", listing.run_id, exc.what)
        stored = None
    text, blocks = listing_message(inst, listing, cmd.run_id, job.actor.user_id, svc.clock(), stored)
    job.tell(text, blocks)
    return f"listed {len(listing.checkpoints)} checkpoints"


def reachable(svc: Services, instance_id: str) -> Instance:
    """The instance, if a script can run on it now; else a typed error that says what to do."""
    inst = svc.fleet.get(instance_id)
    require_running(
        inst,
        Refusals(
            stopped=", so its checkpoints cannot be listed.",
            stopped_why="Checkpoints live on the instance's disk and are read by a script run through SSM. "
            "A stopped instance keeps its disk: they are still there.",
            stopped_fix=f"/runctl start {instance_id}",
            gone="; its disk and any checkpoints on it are gone.",
            gone_fix="/runctl resources",
            pending_why="Its SSM agent needs a minute after boot.",
            pending_fix=f"/runctl checkpoints {instance_id}",
        ),
    )
    svc.fleet.require_agent(inst, "reads checkpoints")
    return inst
