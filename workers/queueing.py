"""The queue, every job's import path, and the one way a job is queued (`enqueue`).

RQ stores a job's import path in Redis, so these strings outlive a deploy: a
rename here needs a shim at the old path for jobs still queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import hiredis
from pydantic import BaseModel, ConfigDict, SerializeAsAny
from redis import Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import DataError
from redis.retry import Retry
from redis.typing import EncodableT
from rq import Callback, Queue
from rq import Retry as JobRetry
from rq.job import Job

from workers.commands import Actor, Command
from workers.errors import QueueUnreachable

QUEUE = "runctl"  # quick jobs: monitor ticks, status, the reconcile, most commands
LONG_QUEUE = "runctl-long"  # jobs that may take minutes: trains (environment builds), stops (grace waits)...
EVENTS_QUEUE = "runctl-events"  # run events (bot/events.py): served in turns with the others, never ahead of them all
QUEUES = (QUEUE, LONG_QUEUE, EVENTS_QUEUE)
# The front door must answer Slack within 3 s even when Redis hangs: connect and read
# timeouts well under it, and no retries (redis-py retries 3 times with backoff by default).
FRONT_TIMEOUT_SECONDS = 0.5


def connect_front(url: str) -> Redis:
    """The web/socket process's Redis: fails fast rather than holding the ack."""
    return Redis.from_url(
        url,
        socket_connect_timeout=FRONT_TIMEOUT_SECONDS,
        socket_timeout=FRONT_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
        command_packer=Packer(),
    )


class Packer:
    """Packs a command in one call to hiredis (C), where redis-py first encodes each argument
    in Python (~0.6 µs an argument; the front door's one script has ~80: issue 28). The same
    bytes either way; what hiredis does not take goes as redis-py would have it (a
    bytearray or memoryview as bytes) or is refused with redis-py's DataError (bool, None)."""

    def pack(self, *args: EncodableT) -> list[bytes]:
        first = args[0]
        if isinstance(first, str | bytes) and (" " in first if isinstance(first, str) else b" " in first):
            args = (*first.split(), *args[1:])  # "SCRIPT LOAD": redis-py sends two words
        try:
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # its stub types a 1-tuple
        except TypeError:
            return [hiredis.pack_command(tuple(_plain(arg) for arg in args))]  # type: ignore[arg-type]


def _plain(arg: object) -> str | bytes | int | float:
    if isinstance(arg, bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str | bytes | int | float) and not isinstance(arg, bool):
        return arg
    raise DataError(f"Invalid input of type: '{type(arg).__name__}'. Convert to a bytes, string, int or float first.")


def unreachable() -> QueueUnreachable:
    return QueueUnreachable(
        "runctl cannot reach its queue; nothing was started.",
        why=f"Redis did not answer within {FRONT_TIMEOUT_SECONDS} s.",
        fix='an admin checks that Redis is up (`redis-cli -u "$REDIS_URL" ping`) and that the web process\'s '
        "`REDIS_URL` points at it; then run the command again. `/runctl help` works meanwhile.",
    )


class JobPath(StrEnum):
    TRAIN = "workers.jobs.train.train"
    STATUS = "workers.jobs.status.status"
    # STOP, START, TERMINATE, CONFIRM_CLICK and RESUME were at workers.jobs.lifecycle.*: re-exported there
    # for the jobs queued before (one release).
    STOP = "workers.jobs.stop.stop"
    START = "workers.jobs.start.start"
    TERMINATE = "workers.jobs.terminate.terminate"
    RESOURCES = "workers.jobs.resources.resources"
    CHECKPOINTS = "workers.jobs.checkpoints.checkpoints"
    BACKUP = "workers.jobs.backup.backup"
    BACKUP_NEW = "workers.jobs.backup.backup_new"
    RESUME_COMMAND = "workers.jobs.resume.resume"
    AUDIT = "workers.jobs.audit.audit"
    LOGS = "workers.jobs.logs.logs"
    FULL_LOG = "workers.jobs.logs.full_log"
    CHART = "workers.jobs.summary.chart_command"
    # Terminate's clicks; launch's too while jobs queued before LAUNCH_CLICK may wait (one release).
    CONFIRM_CLICK = "workers.jobs.terminate.confirm_click"
    LAUNCH_CLICK = "workers.jobs.launch.confirm_click"
    RESUME = "workers.jobs.start.resume"
    MONITOR_TICK = "workers.jobs.monitor.tick"
    RUN_EVENT = "workers.jobs.events.event"
    RECONCILE = "workers.jobs.reconcile.reconcile"
    SWEEP = "workers.jobs.sweep.sweep"
    DIGEST = "workers.jobs.digest.digest"
    WARNING_STOP_NOW = "workers.jobs.warning_actions.stop_now"
    WARNING_SNOOZE = "workers.jobs.warning_actions.snooze"
    WARNING_KEEP = "workers.jobs.warning_actions.keep"
    LAUNCH = "workers.jobs.launch.launch"
    AUTOSTOP = "workers.jobs.autostop.autostop"
    AUTOSTOP_KEEP = "workers.jobs.autostop.keep"
    AUTOSTOP_STOP_NOW = "workers.jobs.autostop.stop_now"
    AUTOSTOP_STOP = "workers.jobs.autostop.stop_idle"
    THEN = "workers.jobs.autostop.then"
    SPOT_REPLACE = "workers.jobs.spot.replace"
    QUEUE = "workers.jobs.queued.queue"
    QUEUE_ADD = "workers.jobs.queued.add"
    QUEUED_START = "workers.jobs.queued.start"
    QUEUE_CANCEL_CLICK = "workers.jobs.queued.cancel_click"
    REPLY = "workers.jobs.replies.deliver"

    @property
    def module(self) -> str:
        return self.value.rsplit(".", 1)[0]


# Jobs that can hold a work horse for minutes: an environment build (up to 30 min), a stop's
# grace wait, waiting for an instance to start or launch, a full log's upload. They run on LONG_QUEUE.
LONG_JOBS = frozenset(
    {
        JobPath.TRAIN,
        JobPath.BACKUP,
        JobPath.BACKUP_NEW,  # train --backup: an upload
        JobPath.RESUME_COMMAND,
        JobPath.STOP,
        JobPath.START,
        JobPath.TERMINATE,
        JobPath.LAUNCH,
        JobPath.RESUME,
        JobPath.CONFIRM_CLICK,
        JobPath.LAUNCH_CLICK,
        JobPath.WARNING_STOP_NOW,
        JobPath.AUTOSTOP_STOP_NOW,
        JobPath.AUTOSTOP_STOP,
        JobPath.THEN,
        JobPath.FULL_LOG,  # gzip and upload of a log up to 1 GB
        JobPath.SPOT_REPLACE,
        JobPath.QUEUE_ADD,  # a git fetch and the script's check
        JobPath.QUEUED_START,  # a train
    }
)


# Commands that only read and answer: repeated after their worker died, they do no harm.
RETRIED = frozenset(
    {JobPath.STATUS, JobPath.RESOURCES, JobPath.CHECKPOINTS, JobPath.AUDIT, JobPath.LOGS, JobPath.CHART}
)
ABANDONED = "workers.jobs.abandoned.report"


def take_turns(ordered: list[Queue], served: Queue) -> list[Queue]:
    """A worker's queue order after it took a job from `served`: after a run event, the other
    queues in their order; after any other job, the events first. A flood of events delays a
    queued command or tick by one event job at most, and no queue keeps the events waiting."""
    events = [q for q in ordered if q.name == EVENTS_QUEUE]
    others = [q for q in ordered if q.name != EVENTS_QUEUE]
    return others + events if served.name == EVENTS_QUEUE else events + others


def queue_of(func: object) -> str:
    return LONG_QUEUE if isinstance(func, str) and func in LONG_JOBS else QUEUE


class RoutedQueue(Queue):
    """The `runctl` queue, handing the LONG_JOBS it is given to `runctl-long`: every place
    that queues a job names the job, never the queue."""

    _long: Queue | None = None

    def _route(self, func: object) -> Queue:
        if self.name == QUEUE and queue_of(func) == LONG_QUEUE:
            if self._long is None:  # made once: a Queue resolves its serializer (~35 µs a train, issue 28)
                self._long = Queue(LONG_QUEUE, connection=self.connection, serializer=self.serializer)
            return self._long
        return self

    def enqueue_call(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        target = self._route(func)
        if target is self:
            return super().enqueue_call(func, *args, **kwargs)
        return target.enqueue_call(func, *args, **kwargs)

    def enqueue_at(self, datetime: Any, f: Any, *args: Any, **kwargs: Any) -> Job:
        target = self._route(f)
        if target is self:
            job: Job = super().enqueue_at(datetime, f, *args, **kwargs)
        else:
            job = target.enqueue_at(datetime, f, *args, **kwargs)
        return job


JOBS: dict[str, JobPath] = {
    "train": JobPath.TRAIN,
    "status": JobPath.STATUS,
    "stop": JobPath.STOP,
    "start": JobPath.START,
    "terminate": JobPath.TERMINATE,
    "resources": JobPath.RESOURCES,
    "checkpoints": JobPath.CHECKPOINTS,
    "logs": JobPath.LOGS,
    "chart": JobPath.CHART,
    "backup": JobPath.BACKUP,
    "resume": JobPath.RESUME_COMMAND,
    "audit": JobPath.AUDIT,
    "launch": JobPath.LAUNCH,
    "autostop": JobPath.AUTOSTOP,
    "queue": JobPath.QUEUE,
}


class Payload(BaseModel):
    """A job's arguments besides the acting person: its fields, in order, are the job
    function's positional arguments (a trailing None is left out: the function's default)."""

    model_config = ConfigDict(frozen=True)


class CommandArgs(Payload):
    command: SerializeAsAny[Command]
    run_id: str | None = None  # a train queued for a run record made already (resume, a start's resume)


class ConfirmArgs(Payload):
    action: str
    nonce: str
    message_ts: str


class RunClickArgs(Payload):
    run_id: str
    message_ts: str


class InstanceClickArgs(Payload):
    instance_id: str
    message_ts: str


class WarningArgs(Payload):
    instance_id: str
    kind: str


class KeepArgs(WarningArgs):
    reason: str


class RunArgs(Payload):
    run_id: str


class EntryArgs(Payload):
    entry_id: str


class EntryClickArgs(Payload):
    entry_id: str
    message_ts: str


class InstanceArgs(Payload):
    instance_id: str


class ReplyArgs(Payload):
    run_id: str
    text: str
    full_log: bool = False
    attempt: int = 1


class NoArgs(Payload):
    pass


@dataclass(frozen=True)
class Spec:
    payload: type[Payload]
    timeout: int  # seconds before RQ kills the job
    actor_at: int | None  # the job function's argument for the acting person; None: a system job


UPLOAD_JOB_SECONDS = 3 * 6 * 3600  # three of backup.UPLOAD_MAX_SECONDS: a backup's uploads
_COMMAND = Spec(CommandArgs, 3600, 1)
# Every path queued by `enqueue`, beside LONG_JOBS (the sweep, the reconcile and the clock's
# ticks and digest are queued by rq's cron: workers/cron.py).
SPECS: dict[JobPath, Spec] = {
    **{path: _COMMAND for path in JOBS.values()},
    JobPath.CONFIRM_CLICK: Spec(ConfirmArgs, 3600, 2),
    JobPath.LAUNCH_CLICK: Spec(ConfirmArgs, 3600, 2),
    JobPath.RESUME: Spec(RunClickArgs, 180, 1),  # it only queues the train
    JobPath.AUTOSTOP_KEEP: Spec(InstanceClickArgs, 1800, 1),
    JobPath.AUTOSTOP_STOP_NOW: Spec(InstanceClickArgs, 1800, 1),
    JobPath.WARNING_STOP_NOW: Spec(WarningArgs, 3600, 2),
    JobPath.WARNING_SNOOZE: Spec(WarningArgs, 180, 2),
    JobPath.WARNING_KEEP: Spec(KeepArgs, 180, 2),
    JobPath.FULL_LOG: Spec(RunArgs, 3600, 1),
    JobPath.THEN: Spec(RunArgs, 1800, 1),  # acts for the run's requester
    JobPath.AUTOSTOP_STOP: Spec(InstanceArgs, 1800, None),
    JobPath.SPOT_REPLACE: Spec(RunArgs, 3600, None),
    JobPath.BACKUP_NEW: Spec(RunArgs, UPLOAD_JOB_SECONDS, None),
    JobPath.DIGEST: Spec(NoArgs, 600, None),
    JobPath.MONITOR_TICK: Spec(NoArgs, 900, None),
    JobPath.RUN_EVENT: Spec(RunArgs, 120, None),
    JobPath.QUEUE_ADD: _COMMAND,
    JobPath.QUEUED_START: Spec(EntryArgs, 3600, 1),  # acts for the queued run's requester
    JobPath.QUEUE_CANCEL_CLICK: Spec(EntryClickArgs, 180, 1),
    JobPath.REPLY: Spec(ReplyArgs, 120, None),
}
SYSTEM = Actor(user_id="runctl", channel_id="")  # who acts in a job the clock, the monitor or an event queues
DAY = 86400
META = "runctl"  # job.meta[META]: who asked and what, for workers/jobs/abandoned.py


def args_of(
    spec: Spec, payload: Payload, actor: Actor, dumped: tuple[dict[str, Any], dict[str, Any]] | None = None
) -> list[object]:
    """The job function's arguments (`dumped`: the payload's and the actor's JSON, if made already)."""
    fields, person = dumped or (payload.model_dump(mode="json"), actor.model_dump(mode="json"))
    args: list[object] = list(fields.values())
    while args and args[-1] is None:
        args.pop()
    if spec.actor_at is not None:
        args.insert(spec.actor_at, person)
    return args


def enqueue(
    queue: Queue,
    path: JobPath,
    payload: Payload,
    actor: Actor,
    *,
    what: str = "",
    when: datetime | None = None,
    delay: timedelta | None = None,
    pipeline: Pipeline | None = None,
    job_id: str | None = None,
) -> Job:
    """Queue `path`'s job for `actor` (SYSTEM for a system job): now, at `when` or after
    `delay`; with a pipeline, the job is written when its owner executes it. `what` names the
    job to its person should its worker die ("your click on [Terminate]"; a command names itself)."""
    spec = SPECS[path]
    if not isinstance(payload, spec.payload):
        raise TypeError(f"{path.name} takes {spec.payload.__name__}, not {type(payload).__name__}")
    if (spec.actor_at is None) != (actor.user_id == SYSTEM.user_id and actor == SYSTEM):
        raise ValueError(f"{path.name}: a system job takes SYSTEM as its actor, and only a system job does")
    dumped = (payload.model_dump(mode="json"), actor.model_dump(mode="json"))  # once: for the args and the meta
    options: dict[str, Any] = {
        "job_timeout": spec.timeout,
        "failure_ttl": 7 * DAY,
        "pipeline": pipeline,
        # RQ's default is the call with its arguments' repr, which its workers log: a person's
        # response_url among them (a credential), and ~5 µs of an ack's CPU (issue 28).
        "description": f"{path.value} for {actor.user_id}",
    }
    if job_id is not None:
        options["job_id"] = job_id
    if spec.actor_at is None:
        options["result_ttl"] = 600
    else:
        # A worker that dies mid-job: RQ retries what only reads and answers, and tells the
        # person about the rest (workers/jobs/abandoned.py).
        options["result_ttl"] = DAY
        options["on_failure"] = Callback(ABANDONED)
        options["retry"] = JobRetry(max=1) if path in RETRIED else None
        options["meta"] = {META: {"actor": dumped[1], "payload": dumped[0], "what": what}}
    args = args_of(spec, payload, actor, dumped)
    if when is not None:
        job: Job = queue.enqueue_at(when, path.value, *args, **options)
    elif delay is not None:
        job = queue.enqueue_in(delay, path.value, *args, **options)
    else:
        job = queue.enqueue(path.value, *args, **options)
    return job


def enqueue_command(
    queue: Queue, command: Command, actor: Actor, run_id: str | None = None, pipeline: Pipeline | None = None
) -> Job:
    """A slash command's job (`entry(command_json, actor_json[, run_id])`)."""
    return enqueue(queue, JOBS[command.name], CommandArgs(command=command, run_id=run_id), actor, pipeline=pipeline)
