"""Every job waiting on runctl's queues: a check that reads one queue misses the others
(trains and stops wait on `runctl-long`, run events on `runctl-events`)."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job

from workers.queueing import QUEUES


def queued(redis: Redis) -> list[Job]:
    return [job for name in QUEUES for job in Queue(name, connection=redis).jobs]
