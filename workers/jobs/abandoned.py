"""RQ's failure callback for commands: a job whose worker died mid-job (RQ's
StartedJobRegistry cleanup raises AbandonedJobError for it) is retried by RQ when it is
safe to repeat (`queueing.RETRIED`: it only reads and answers), and otherwise told to the
person who asked, since repeating a half-done train, stop or terminate could do it twice. Every job a person
starts carries this callback and, in its meta, who asked and what (`queueing.enqueue`): a
click is told in the thread of the message its button is on."""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job as RqJob

from workers.jobs.funnel import Job, actor_of
from workers.queueing import META
from workers.services import current
from workers.slack.thread import reply

log = logging.getLogger(__name__)


def report(job: RqJob, connection: Redis, exc_type: type[BaseException], *_: Any) -> None:
    if exc_type is not AbandonedJobError:
        return  # the job raised: the funnel has told the person already
    if job.retries_left:
        return  # RQ runs it again
    meta = job.meta.get(META) if isinstance(job.meta, dict) else None
    # A command queued by the release before carried no meta: its arguments tell.
    asked = meta if isinstance(meta, dict) else _queued_before_meta(job)
    if asked is None:
        return
    svc = current()
    actor = actor_of(asked.get("actor"))
    payload: dict[str, Any] = asked["payload"] if isinstance(asked.get("payload"), dict) else {}
    what = str(asked.get("what") or "your click")
    command = payload.get("command")
    name = str(command.get("name", "?")) if isinstance(command, dict) else ""
    iid = str((command if isinstance(command, dict) else payload).get("instance_id") or "")
    check = f"`/runctl status {iid}`" if iid else "`/runctl resources`"
    doing = f"doing `/runctl {name}`" if name else f"handling {what}"
    again = "run it again" if name else "do it again"
    text = (
        f"runctl's worker stopped (killed or restarted) while {doing}, so it may be half "
        f"done; runctl does not repeat it by itself. Check with {check}, then {again} if it is needed."
    )
    run_id = payload.get("run_id")
    run = svc.runs.get(run_id) if isinstance(run_id, str) else None
    if run is not None and run.message_ts:
        if name == "train":
            text += (
                f" If the training had started, runctl picks it up within "
                f"{svc.settings.RUNCTL_RECONCILE_SECONDS} s and follows it here."
            )
        reply(svc, run, text)
    else:
        thread = payload.get("message_ts")
        Job(svc, actor, f"/runctl {name}" if name else what, instance_id=iid, thread_ts=thread or None).tell(text)
    log.warning("abandoned job %s (%s for %s) reported", job.id, f"/runctl {name}" if name else what, actor.user_id)


def _queued_before_meta(job: RqJob) -> dict[str, Any] | None:
    """`entry(command_json, actor_json[, run_id])`, as queueing.CommandArgs lays it out."""
    args = list(job.args)
    if len(args) < 2 or not isinstance(args[0], dict):
        return None
    run_id = args[2] if len(args) > 2 and isinstance(args[2], str) else None
    return {"actor": args[1], "payload": {"command": args[0], "run_id": run_id}, "what": ""}
