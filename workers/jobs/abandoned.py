"""RQ's failure callback for commands: a job whose worker died mid-job (RQ's
StartedJobRegistry cleanup raises AbandonedJobError for it) is retried by RQ when it is
safe to repeat (`queueing.RETRIED`: it only reads and answers), and otherwise told to the
person who asked, since repeating a half-done train, stop or terminate could do it twice."""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job as RqJob

from workers.jobs.funnel import Job, actor_of
from workers.services import current
from workers.slack.thread import reply

log = logging.getLogger(__name__)


def report(job: RqJob, connection: Redis, exc_type: type[BaseException], *_: Any) -> None:
    if exc_type is not AbandonedJobError:
        return  # the job raised: the funnel has told the person already
    if job.retries_left:
        return  # RQ runs it again
    args = list(job.args)
    if len(args) < 2 or not isinstance(args[0], dict):
        return
    svc = current()
    actor = actor_of(args[1])
    name = str(args[0].get("name", "?"))
    iid = str(args[0].get("instance_id") or "")
    check = f"`/runctl status {iid}`" if iid else "`/runctl resources`"
    text = (
        f"runctl's worker stopped (killed or restarted) while doing `/runctl {name}`, so it may be half "
        f"done; runctl does not repeat it by itself. Check with {check}, then run it again if it is needed."
    )
    run = svc.runs.get(args[2]) if len(args) > 2 and isinstance(args[2], str) else None
    if run is not None and run.message_ts:
        if name == "train":
            text += (
                f" If the training had started, runctl picks it up within "
                f"{svc.settings.RUNCTL_RECONCILE_SECONDS} s and follows it here."
            )
        reply(svc, run, text)
    else:
        Job(svc, actor, f"/runctl {name}", instance_id=iid).tell(text)
    log.warning("abandoned job %s (/runctl %s for %s) reported", job.id, name, actor.user_id)
