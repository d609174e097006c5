"""Which job runs each command, and how the front queues it."""

from __future__ import annotations

from redis.client import Pipeline
from rq import Queue
from rq.job import Job

from workers.commands import Command, Requester

JOBS: dict[str, str] = {
    "train": "workers.jobs.train.train",
    "status": "workers.jobs.status.status",
    "stop": "workers.jobs.lifecycle.stop",
    "start": "workers.jobs.lifecycle.start",
    "terminate": "workers.jobs.lifecycle.terminate",
    "resources": "workers.jobs.resources.resources",
    "checkpoints": "workers.jobs.checkpoints.checkpoints",
    "audit": "workers.jobs.audit.audit",
}


def enqueue(
    queue: Queue, command: Command, requester: Requester, run_id: str | None = None, pipeline: Pipeline | None = None
) -> Job:
    """Queue the command's job; with a pipeline, the job is written when its owner executes it."""
    path = JOBS[command.name]
    args: list[object] = [command.model_dump(mode="json"), requester.model_dump(mode="json")]
    if run_id is not None:
        args.append(run_id)
    return queue.enqueue(
        path, *args, job_timeout=3600, result_ttl=86400, failure_ttl=7 * 86400, pipeline=pipeline
    )
