"""Queued runs (issue 27): a busy instance takes the next run in line.

- `add` (`train … --queue`, [Queue after it]) checks the run as a train would before it
  touches the instance (ref resolved and pinned to its commit, the script read and compiled
  at it, the requester's rights, their limit of queued runs), writes its durable record to
  S3, then queues it in Redis (workers/state/run_queue.py) and tells the requester and the
  live run's thread.
- `advance` is called when a run ends, however it ends (the monitor's `finish` and `lost`,
  which the run-events path reaches too), when an instance is started, and by the fallbacks
  (every monitor tick and reconcile pass: `sweep`). It takes the head of the instance's queue
  in one transaction with its start job, so two workers never start the same queued run.
- `start` is that job: the requester's rights again, as they are now, then the train flow
  itself (`TrainFlow`: the operation lock, the train lock, the pid files). A start refused or
  failed is told to the requester and the queue moves on; one that finds the instance taken
  after all (a `train` got there first) goes back to the head.
- `restore` reads the durable copy back into a Redis that lost it (docs/queue.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis.client import Pipeline
from slack_sdk.errors import SlackApiError

from workers import policy
from workers.commands import Actor, QueueCommand, TrainCommand
from workers.errors import InstanceError, PermissionDenied, RunConflict, RunctlError
from workers.jobs import funnel, multinode, train
from workers.jobs.funnel import Job
from workers.queueing import EntryArgs, JobPath, enqueue
from workers.services import Services, current
from workers.slack import updates
from workers.slack.escape import code
from workers.slack.messages import queue as messages
from workers.slack.thread import fail, reply
from workers.state import records
from workers.state.locks import train_lock
from workers.state.run_queue import (
    LOADED,
    PREFIX,
    BadRecord,
    Entry,
    QueueFull,
    QueueStore,
    new_entry_id,
    record_name,
    signed_record,
    verified_record,
)
from workers.state.runs import Run, RunState, new_run

log = logging.getLogger(__name__)
GONE = ("terminated", "shutting-down")
RETRY_PAUSE_SECONDS = 60  # a start that found a run Redis does not know: try again after this
STALE_HOLD_SECONDS = 660  # the reconcile's cached fleet (reconcile.FLEET_SECONDS, 600 s) and a minute


# --- queueing ------------------------------------------------------------------------


@funnel.command(TrainCommand)
def add(job: Job, cmd: TrainCommand, entry_id: str | None = None) -> str:
    """`train … --queue` and [Queue after it]: the funnel re-checked the requester's rights
    for the train (and its `--then`); here the code, the limit, then the queue."""
    svc = job.svc
    ensure_loaded(svc)
    iid = cmd.instance_id
    now = svc.clock()
    if cmd.nodes:  # a node set is one request: queued on every node, started when all are free
        ids = multinode.node_ids(svc, iid, cmd)
        multinode.check_rights(svc, job.actor, cmd, ids)
        cmd = cmd.model_copy(update={"nodes": tuple(ids)})
    for node in cmd.nodes or (iid,):
        inst = svc.fleet.get(node)
        if inst.state in GONE:
            raise RunctlError(f"{inst.label} is `{inst.state}`; nothing can be queued on it.", fix="/runctl resources")
        if inst.state not in ("running", "pending") and not QueueStore(svc.redis).held(node):
            raise RunctlError(
                f"{inst.label} is `{inst.state}`; a run is queued only behind a running instance's live run.",
                why="A queue waits for a stopped instance only when runctl's `stop` stopped it with runs queued.",
                fix=f"/runctl start {node}",
            )
    ref = cmd.ref or svc.settings.RUNCTL_REF
    sha = ""
    if cmd.sync_code:
        svc.repo.sync()
        sha = svc.repo.resolve(ref)
        svc.repo.check_script(sha, ref, cmd.script)  # exists and compiles at that commit
    entry = Entry(
        entry_id=entry_id or new_entry_id(now),
        instance_id=iid,
        actor=job.actor,
        command=cmd.model_copy(update={"ref": sha or cmd.ref, "queue": False, "force": False}),
        ref_name=ref,
        sha=sha,
        queued_at=now,
        score=int(now.timestamp() * 1e9),
    )
    store = QueueStore(svc.redis)
    limit = queue_limit(svc)
    if limit is not None and store.count_of(job.actor.user_id) >= limit:
        raise too_many(svc, job.actor.user_id, limit)
    live = svc.runs.live_on(iid)
    entry.behind = live.run_id if live else ""
    persist(svc, entry)  # the durable copy first: what Redis has, S3 has
    try:
        position = store.add(entry, limit)
    except QueueFull:
        forget(svc, entry)
        raise too_many(svc, job.actor.user_id, limit or 0) from None
    text, blocks = messages.queued(entry, position, live, svc.clock())
    job.tell(text, blocks)
    if live is not None and live.message_ts:
        said, shown = messages.next_in_thread(entry, position)
        try:
            entry.cancel_ts = svc.notifier.post(live.channel_id, said, shown, thread_ts=live.message_ts)
            store.save(entry)
        except SlackApiError as exc:
            log.warning("queue %s: could not tell run %s's thread: %s", entry.entry_id, live.run_id, exc)
    for node in entry.nodes:
        show_queue(svc, node)
        advance(svc, node)  # an idle instance takes it at once
    return f"queued {entry.entry_id} at {position}"


def too_many(svc: Services, user_id: str, limit: int) -> RunctlError:
    return RunctlError(
        f"You have {limit} queued run{'s' if limit != 1 else ''} already, the most one person may have.",
        why="A per-person limit keeps instances from being booked far ahead (`queue_limit` in the policy file).",
        fix="`/runctl queue` lists them; `/runctl queue cancel <id>` frees a place.",
    )


def queue_limit(svc: Services) -> int | None:
    limit = policy.load(svc.settings).queue_limit
    return None if limit <= 0 else limit


# --- the durable copy --------------------------------------------------------------------


def persist(svc: Services, entry: Entry) -> None:
    svc.fleet.put_object(record_name(entry), signed_record(records.record_key(svc.settings), entry))


def forget(svc: Services, entry: Entry) -> None:
    try:
        svc.fleet.delete(record_name(entry))
    except RunctlError as exc:  # a record left behind is dropped by the next restore: its run exists
        log.warning("queue %s: could not delete its S3 record: %s", entry.entry_id, exc.what)


def ensure_loaded(svc: Services) -> None:
    """Read the durable copy into a Redis that has not got it (a fresh or emptied Redis)."""
    if svc.redis.exists(LOADED):
        return
    if not svc.redis.set(LOADED + ":claim", "1", nx=True, ex=120):
        return  # another worker restores right now
    try:
        restore(svc)
        svc.redis.set(LOADED, "1")
    finally:
        svc.redis.delete(LOADED + ":claim")


def restore(svc: Services) -> int:
    """Every queued run S3 keeps that Redis lacks goes back in its place; one whose instance is
    gone is told to its requester and dropped. Returns how many were put back."""
    key = records.record_key(svc.settings)
    store = QueueStore(svc.redis)
    fleet = svc.fleet
    back = 0
    for name in fleet.keys(PREFIX):
        data = fleet.read_object(name)
        if data is None:
            continue
        try:
            entry = verified_record(key, name, data)
        except BadRecord as exc:
            log.warning("queue restore: ignored s3 record %s: %s", name, exc)
            continue
        if svc.runs.get(entry.entry_id) is not None:  # it started; its record outlived the start
            forget(svc, entry)
            continue
        try:
            inst = fleet.get(entry.instance_id)
            gone = inst.state in GONE
        except InstanceError:
            gone = True
        if gone:
            forget(svc, entry)
            lost_text = (
                f":warning: Your queued run `{entry.entry_id}` ({code(entry.command.script)} on "
                f"`{entry.instance_id}`) was dropped: the instance is gone."
            )
            _tell(svc, entry.actor, lost_text)
            continue
        if store.restore(entry):
            back += 1
    return back


# --- starting the next run -----------------------------------------------------------------


def advance(svc: Services, instance_id: str, ended: Run | None = None) -> Entry | None:
    """Start the head of the instance's queue when nothing holds the instance; the ended
    run's thread says who is next."""
    ensure_loaded(svc)
    store = QueueStore(svc.redis)
    settle_orphan(svc, store, instance_id)

    def queue_job(pipe: Pipeline, entry: Entry) -> None:
        enqueue(
            svc.queue,
            JobPath.QUEUED_START,
            EntryArgs(entry_id=entry.entry_id),
            entry.actor,
            what=f"the start of your queued run `{entry.entry_id}`",
            pipeline=pipe,
        )

    entry = store.take_next(instance_id, queue_job)
    if entry is None:
        store.forget_instance(instance_id)
        return None
    if ended is not None and ended.message_ts:
        reply(svc, ended, messages.next_up(entry), mention=False)
    return entry


def settle_orphan(svc: Services, store: QueueStore, instance_id: str) -> None:
    """A start job whose worker died after its run started (or ended) never cleared its
    "starting" marker, which would hold the queue for its TTL (an hour): the run's record
    says the start happened, so the marker is cleared here as the job would have."""
    marker = store.starting(instance_id)
    if not marker or marker == "pause":
        return
    run = svc.runs.get(marker)
    if run is None or (run.started_at is None and not run.state.ended):
        return  # not started yet: its job is at work (or RQ's failure handling answers for it)
    log.warning("queue: run %s started but its start job did not settle; freeing %s", marker, instance_id)
    entry = store.get(marker)
    if entry is None:
        store.release(marker, [instance_id])
        return
    store.started(entry)
    forget(svc, entry)


def after_end(svc: Services, run: Run) -> None:
    """The monitor's hook: a run ended (its locks released), so the next in line starts, on each of its nodes."""
    for iid in run.node_ids:
        try:
            advance(svc, iid, run)
        except Exception:  # the fallbacks (tick, reconcile) start it; the end is told regardless
            log.exception("queue: could not advance %s after run %s", iid, run.run_id)


def sweep(svc: Services) -> int:
    """The fallback: every instance with a queue and nothing holding it takes its next run."""
    started = 0
    store = QueueStore(svc.redis)
    for iid in store.instances():
        if store.waiting(iid) == 0:
            store.forget_instance(iid)
            continue
        settle_orphan(svc, store, iid)
        if store.starting(iid) or store.held(iid) or train_lock(svc.redis, iid).raw() is not None:
            continue
        if advance(svc, iid) is not None:
            started += 1
    return started


@funnel.system("the start of a queued run")
def start(entry_id: str, raw_actor: dict[str, object]) -> str:
    """The start job of a queued run (`JobPath.QUEUED_START`), for its requester."""
    svc = current()
    actor = funnel.actor_of(raw_actor)
    store = QueueStore(svc.redis)
    entry = store.get(entry_id)
    if entry is None:
        return "gone: cancelled, or started already"
    job = Job(svc, actor, f"the start of queued run `{entry_id}`", instance_id=entry.instance_id)
    outcome = "failed"
    waits = False
    try:

        def flow() -> str:
            nonlocal waits
            try:
                return _start(job, entry)
            except RunConflict as exc:
                if job.run is not None and job.run.message_ts:  # its parent was posted: close it
                    exc.what = f"{exc.what} Your queued run goes back to the head of the queue."
                    fail(svc, job.run, exc, RunState.REFUSED)
                elif job.run is not None:
                    job.run.state = RunState.REFUSED
                    svc.runs.save(job.run)
                job.run = None
                waits = True
                return "waits: the instance is taken"

        outcome = funnel.settle(job, flow)
    finally:
        if waits:
            # Taken by a run Redis knows (its lock): its end starts this one. Else (pid files on the
            # instance, a run Redis lost) the fallbacks try again after a pause, not every tick.
            locked = any(train_lock(svc.redis, node).raw() is not None for node in entry.nodes)
            store.put_back(entry, pause_s=0 if locked else RETRY_PAUSE_SECONDS)
        else:
            store.started(entry)
            forget(svc, entry)
            if entry.cancel_ts and entry.behind:
                _close_cancel(svc, entry, outcome)
            if job.run is None or job.run.state.ended:  # not started: the queue moves on
                after = svc.runs.get(entry_id)
                for node in entry.nodes:
                    advance(svc, node, after if after and after.message_ts else None)
    return outcome


def _start(job: Job, entry: Entry) -> str:
    svc = job.svc
    cmd = entry.command
    run = svc.runs.get(entry.entry_id)
    if run is None or run.state.ended:
        run = svc.runs.create(new_run(svc, cmd, job.actor, entry.entry_id))
    job.run = run
    job.failed_state = RunState.REFUSED
    try:
        tags = (lambda iid: svc.fleet.get(iid).tags) if policy.needs_owner(svc.settings, policy.actions(cmd)) else None
        policy.recheck_command(svc.settings, job.actor, cmd, policy.owner_of(svc.redis, cmd, tags=tags))
        return train.execute(job, cmd).state.value
    except RunConflict:
        raise
    except RunctlError as exc:
        if not run.message_ts:  # refused before its parent message: said privately, as the queued run
            exc.what = (
                f"Your queued run `{entry.entry_id}` ({code(cmd.script)} on `{entry.instance_id}`) was not started: "
                f"{exc.what}"
            )
        raise


def _close_cancel(svc: Services, entry: Entry, outcome: str) -> None:
    behind = svc.runs.get(entry.behind)
    if behind is None:
        return
    text = messages.settled(entry, outcome)
    svc.notifier.try_update(behind.channel_id, entry.cancel_ts, text, messages.plain(text), what="a queued run")


# --- listing and cancelling --------------------------------------------------------------


@funnel.command(QueueCommand)
def queue(job: Job, cmd: QueueCommand) -> str:
    """`/runctl queue [instance]` lists; `/runctl queue cancel <id>` cancels."""
    svc = job.svc
    ensure_loaded(svc)
    if cmd.cancel:
        text = cancel(svc, job.actor, cmd.cancel)
        job.tell(text)
        return text
    store = QueueStore(svc.redis)
    ids = [cmd.instance_id] if cmd.instance_id else store.instances()
    listed = [(iid, svc.runs.live_on(iid), store.entries(iid)) for iid in ids]
    text, blocks = messages.listing(listed, svc.clock(), only=cmd.instance_id)
    job.tell(text, blocks)
    return f"listed {sum(len(e) for _, _, e in listed)}"


def cancel(svc: Services, actor: Actor, entry_id: str) -> str:
    store = QueueStore(svc.redis)
    entry = store.get(entry_id)
    if entry is None or entry_id not in store.ids(entry.instance_id):
        return f"Queued run `{entry_id}` is not waiting (it started, was cancelled, or never was); nothing was done."
    if actor.user_id != entry.user_id and not policy.is_admin(svc.settings, actor.user_id):
        raise PermissionDenied(
            f"Only <@{entry.user_id}>, who queued `{entry_id}`, or an admin can cancel it; nothing was done.",
            fix=f"Ask <@{entry.user_id}> or an admin.",
        )
    if store.remove(entry_id) is None:
        return f"Queued run `{entry_id}` is starting already; `/runctl stop {entry.instance_id}` stops it."
    forget(svc, entry)
    for node in entry.nodes:
        store.forget_instance(node)
        show_queue(svc, node)
    text = f":x: Queued run `{entry_id}` ({code(entry.command.script)} on `{entry.instance_id}`) was cancelled"
    text += "." if actor.user_id == entry.user_id else f" by <@{actor.user_id}>."
    if entry.cancel_ts and entry.behind:
        behind = svc.runs.get(entry.behind)
        if behind is not None:
            svc.notifier.try_update(behind.channel_id, entry.cancel_ts, text, messages.plain(text), what="a queued run")
    if actor.user_id != entry.user_id:
        _tell(svc, entry.actor, text)
    return text


@funnel.click("your click on [Cancel]", 1)
def cancel_click(job: Job, entry_id: str, message_ts: str) -> str:
    job.thread_ts = None
    text = cancel(job.svc, job.actor, entry_id)
    job.tell(text)
    return text


def drop_all(svc: Services, instance_id: str, why: str) -> list[str]:
    """The instance goes (terminate): its queued runs are cancelled, each requester told."""
    ensure_loaded(svc)
    store = QueueStore(svc.redis)
    dropped = []
    for entry in store.entries(instance_id):
        if store.remove(entry.entry_id) is None:
            continue
        forget(svc, entry)
        _tell(
            svc,
            entry.actor,
            f":x: Your queued run `{entry.entry_id}` ({code(entry.command.script)} on `{instance_id}`) "
            f"was cancelled: {why}.",
        )
        dropped.append(entry.entry_id)
    store.forget_instance(instance_id)
    return dropped


def show_queue(svc: Services, instance_id: str) -> None:
    """The live run's parent shows how many wait after it: the queue changed."""
    live = svc.runs.live_on(instance_id)
    if live is not None and live.message_ts:
        updates.show(svc, live)


def lines_for(svc: Services, instance_id: str) -> list[str]:
    """The queue, for `status` and terminate's confirmation."""
    return messages.queue_lines(QueueStore(svc.redis).entries(instance_id))


def _tell(svc: Services, actor: Actor, text: str) -> None:
    try:
        if actor.channel_id:
            svc.notifier.ephemeral(actor.channel_id, actor.user_id, text, response_url=actor.response_url)
        else:
            svc.notifier.post(actor.user_id, text)
    except SlackApiError as exc:
        log.warning("queue: could not tell %s: %s", actor.user_id, exc.response.get("error"))


def fallback(svc: Services, load: bool = False, running: Iterable[str] = ()) -> None:
    """The monitor tick's and the reconcile's fallback (`load`: the reconcile's, which also reads
    the durable copy back into a Redis that lost it, and lets go the queues of stopped instances
    seen `running` again, started outside runctl); it never breaks them."""
    try:
        if load:
            ensure_loaded(svc)
        store = QueueStore(svc.redis)
        now = svc.clock().timestamp()
        for iid in running:
            since = store.held_since(iid)
            # The reconcile's list of running instances may be FLEET_SECONDS old: only a hold older
            # than that is of an instance started again since.
            if since is not None and now - since > STALE_HOLD_SECONDS:
                store.unhold(iid)
        sweep(svc)
    except Exception:
        log.exception("queue: the fallback sweep failed")


@contextmanager
def held_while_stopping(svc: Services, instance_id: str) -> Iterator[Hold]:
    """A stop: while it halts the live run nothing starts, and once the instance is stopped
    (`hold.stopped`) its queue waits for `/runctl start`; a stop that did not happen lets it go on."""
    store = QueueStore(svc.redis)
    hold = Hold()
    store.hold(instance_id, svc.clock().timestamp())
    try:
        yield hold
    finally:
        if not hold.stopped:
            store.unhold(instance_id)
            after_start(svc, instance_id)


@dataclass
class Hold:
    stopped: bool = False

    def note(self, svc: Services, instance_id: str) -> str:
        waiting = QueueStore(svc.redis).waiting(instance_id)
        if not waiting:
            return ""
        return (
            f":inbox_tray: {waiting} queued run{'s' if waiting != 1 else ''} wait{'s' if waiting == 1 else ''} "
            f"for it: the next starts when `/runctl start {instance_id}` brings it back."
        )


def after_start(svc: Services, instance_id: str) -> None:
    """An instance started again: runs queued while it was stopped go on."""
    try:
        QueueStore(svc.redis).unhold(instance_id)
        advance(svc, instance_id)
    except Exception:
        log.exception("queue: could not advance %s after its start", instance_id)
