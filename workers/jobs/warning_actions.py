"""What the buttons on a warning do: [Stop now], [Snooze 24h], [Keep running].

The bot acks the click and queues one of these; each refreshes the post the
warning is in so the channel sees who decided what.
"""

from __future__ import annotations

from workers.errors import RunctlError
from workers.jobs import funnel
from workers.jobs.funnel import Job
from workers.jobs.stop import stop_flow
from workers.services import Services
from workers.slack import updates
from workers.state.warnings import WINDOW, Kind, Status, WarningRecord, WarningStore


@funnel.click("click snooze warning", 2)
def snooze(job: Job, instance_id: str, kind: str) -> str:
    """[Snooze 24h] (`snooze(instance_id, kind, actor)`): the owner's or an admin's."""
    job.instance_id = instance_id
    _allow_owner(job, "snooze", instance_id, Kind(kind))
    return _quiet(job.svc, instance_id, Kind(kind), job.actor.user_id, Status.SNOOZED, "")


@funnel.click("click keep running", 2)
def keep(job: Job, instance_id: str, kind: str, reason: str = "") -> str:
    """[Keep running] with its reason (`keep(instance_id, kind, actor, reason)`): the owner's or an admin's."""
    job.instance_id = instance_id
    _allow_owner(job, "keep", instance_id, Kind(kind))
    return _quiet(job.svc, instance_id, Kind(kind), job.actor.user_id, Status.KEPT, reason.strip()[:500])


@funnel.click("click stop now", 2)
def stop_now(job: Job, instance_id: str, kind: str) -> str:
    """[Stop now] (`stop_now(instance_id, kind, actor)`)."""
    svc = job.svc
    job.instance_id = instance_id
    store = WarningStore(svc.redis)
    record = store.get(instance_id, Kind(kind))
    job.allow("stop", owner_id=record.owner if record else None)
    actor = job.actor
    thread_ts = None
    if record is not None:
        record.status, record.acted_by, record.updated_at = Status.STOPPING, actor.user_id, svc.clock()
        _show(svc, store.save(record))
        thread_ts = record.thread_ts or record.ts
        actor = job.actor = actor.model_copy(update={"channel_id": record.channel})
        job.thread_ts = thread_ts
    try:
        return stop_flow(svc, instance_id, actor, thread_ts=thread_ts)
    except RunctlError:
        # The stop did not happen: bring the buttons back; the funnel says why, in the thread.
        if record is not None:
            record.status, record.acted_by = Status.OPEN, None
            _show(svc, store.save(record))
        raise


def _allow_owner(job: Job, verb: str, instance_id: str, kind: Kind) -> None:
    record = WarningStore(job.svc.redis).get(instance_id, kind)
    job.allow(verb, owner_id=record.owner if record else None)


def _quiet(svc: Services, instance_id: str, kind: Kind, user_id: str, status: Status, reason: str) -> str:
    store = WarningStore(svc.redis)
    record = store.get(instance_id, kind)
    if record is None:
        return "gone"
    now = svc.clock()
    record.status, record.acted_by, record.reason = status, user_id, reason
    record.quiet_until, record.updated_at = now + WINDOW, now
    _show(svc, store.save(record))
    return f"{status.value} until {record.quiet_until:%Y-%m-%d %H:%M} UTC"


def _show(svc: Services, record: WarningRecord) -> None:
    """Refresh the post the warning is in, through the coalescer (Slack's chat.update budget)."""
    if record.ts is not None:
        updates.show_post(svc, record.channel, record.ts)
