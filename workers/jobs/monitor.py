"""Follow a live run: poll the instance with backoff, update the parent message,
renew the lock, and report the end."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from rq import get_current_job

from workers import remote
from workers.errors import InstanceError, RunctlError, Throttled
from workers.jobs import autostop, backup, funnel, queued, summary
from workers.queueing import SYSTEM, JobPath, RunArgs, enqueue
from workers.remote import spot, torchrun
from workers.remote.status import Snapshot, parse_many
from workers.services import Services, current
from workers.slack import updates
from workers.slack.escape import block, code
from workers.slack.format import duration
from workers.slack.messages.run import checkpoint_text
from workers.slack.thread import publish, reply
from workers.state import event_keys
from workers.state.locks import extend_all, release_all
from workers.state.polls import DUE, claim, ensure_tick, release, renew, schedule, tick_started
from workers.state.runs import STOP_SIGNALS, Run, RunState, ended_state

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 15


BATCH = 50  # SendCommand targets at most 50 instances
# A spot notice gives two minutes: a spot run is polled at least this often, so the bot sees
# the interruption (and the checkpoint it saved) before the instance goes.
SPOT_POLL_MAX = timedelta(seconds=30)
POLL_FIRST_WAIT = 1.0  # s before the first result check: SSM usually has the status by then


def next_delay(svc: Services, polls: int) -> timedelta:
    low = svc.settings.RUNCTL_POLL_MIN_SECONDS
    high = svc.settings.RUNCTL_POLL_MAX_SECONDS
    return timedelta(seconds=min(high, low * (1.6**polls)))


def absorb(run: Run, snap: Snapshot) -> None:
    if snap.progress is not None:
        run.progress = snap.progress
    if snap.checkpoint is not None:
        run.checkpoint = snap.checkpoint
    if snap.log:
        run.log_tail = "\n".join(snap.log)


def watch_gpus(run: Run, snap: Snapshot, now: datetime, idle_percent: float) -> None:
    """Keep the newest GPU figures, and since when every GPU has been near 0 % (for the sweep)."""
    run.gpus = snap.gpus
    utils = [g.utilization for g in snap.gpus or [] if g.utilization is not None]
    if not utils or max(utils) > idle_percent:
        run.gpu_idle_since = None
    elif run.gpu_idle_since is None:
        run.gpu_idle_since = now


@funnel.system("monitor tick")
def tick(source: str = "scheduled") -> str:
    """Poll every run that is due, one SSM command per 50 instances. Each run is leased
    while it is polled: if this tick dies (its worker SIGKILLed), the lease lapses and the
    next tick polls the run again. The clock queues a tick too (`source="clock"`), so a
    scheduled tick lost with its worker is replaced within RUNCTL_POLL_MAX_SECONDS."""
    svc = current()
    now = svc.clock().timestamp()
    job = get_current_job()
    if source != "clock" and not tick_started(svc, now, job.id if job else ""):
        return "replaced by an earlier tick"
    updates.flush(svc)  # message updates that waited for Slack's budget
    horizon = now + svc.settings.RUNCTL_POLL_MIN_SECONDS / 4
    claimed, lease = claim(svc, horizon)
    found = svc.runs.get_many(claimed)
    runs = [found[i] for i in claimed if i in found and not found[i].state.ended]
    release(svc, [i for i in claimed if i not in {r.run_id for r in runs}], lease)
    try:
        for start in range(0, len(runs), BATCH):
            batch = runs[start : start + BATCH]
            ids = [r.run_id for r in batch]
            lease = renew(svc, ids, lease)
            poll(svc, batch)
            release(svc, ids, lease)
    except Exception:
        for run in runs:  # claimed but not rescheduled: still follow them after the crash
            if svc.redis.zscore(DUE, run.run_id) is None:
                schedule(svc, run.run_id, next_delay(svc, run.polls + 1))
        release(svc, [r.run_id for r in runs], lease)
        raise
    upcoming = svc.redis.zrange(DUE, 0, 0, withscores=True)
    waiting = updates.flush(svc)
    nexts = [float(upcoming[0][1])] if upcoming else []
    if waiting is not None:
        nexts.append(svc.clock().timestamp() + waiting)
    if nexts:
        ensure_tick(svc, min(nexts))  # one next tick, the earliest (it queues the one after)
    queued.fallback(svc)  # a queue whose run's end was missed moves on here
    return f"polled {len(runs)}"


def monitor(run_id: str) -> str:
    """Poll one run now, in this process: not a job (RQ runs only `JobPath`s); the tests and
    benchmarks call it to take one run through a tick."""
    svc = current()
    schedule(svc, run_id, timedelta(0))
    return tick()


def poll(svc: Services, runs: list[Run], first_poll: float = POLL_FIRST_WAIT) -> None:
    """One status command for `runs`; someone waiting (a run event) passes a shorter first_poll."""
    for run in [r for r in runs if r.nodes]:  # a multi-node run: every node's view, merged
        poll_nodes(svc, run, first_poll)
    runs = [r for r in runs if not r.nodes]
    if not runs:
        return
    by_instance: dict[str, list[Run]] = {}
    for run in runs:
        by_instance.setdefault(run.instance_id, []).append(run)
    batched = len(by_instance) > 1
    # Batched output comes back through ListCommandInvocations (2,500 chars each): keep it short.
    script = remote.runs_status(
        svc.settings.RUNCTL_REMOTE_ROOT,
        [r.run_id for r in runs],
        log_lines=5 if batched else LOG_TAIL_LINES,
        line_chars=160 if batched else 300,
    )
    try:
        results = svc.fleet.run_many(list(by_instance), script, first_poll=first_poll)
    except Throttled:
        for run in runs:
            schedule(svc, run.run_id, next_delay(svc, run.polls + 2))
        return
    except RunctlError as exc:
        if batched:  # one bad instance fails the whole SendCommand: poll one by one
            for group in by_instance.values():
                poll(svc, group)
            return
        for run in runs:
            unreachable(svc, run, exc)
        return
    for iid, group in by_instance.items():
        result = results.get(iid)
        found = parse_many(result.stdout) if result else {}
        for run in group:
            try:
                update(svc, run, found.get(run.run_id))
            except Exception:  # one run's failure is its own: the rest of the batch still updates
                log.exception("monitor %s: update failed", run.run_id)
                schedule(svc, run.run_id, next_delay(svc, run.polls + 1))


def poll_nodes(svc: Services, run: Run, first_poll: float = POLL_FIRST_WAIT) -> None:
    """A multi-node run: the same status script on each node, merged (workers/remote/torchrun.py);
    it ends once every node's torchrun has, and a failure names the node, rank and exception."""
    script = remote.runs_status(svc.settings.RUNCTL_REMOTE_ROOT, [run.run_id], log_lines=LOG_TAIL_LINES)
    try:
        results = svc.fleet.run_many(run.node_ids, script, first_poll=first_poll)
    except Throttled:
        schedule(svc, run.run_id, next_delay(svc, run.polls + 2))
        return
    except RunctlError as exc:
        unreachable(svc, run, exc)
        return
    snaps = {iid: parse_many(res.stdout).get(run.run_id) if res else None for iid, res in results.items()}
    missing = torchrun.gone(run.node_ids, snaps)
    if missing and len(missing) < len(run.node_ids):
        lost(svc, run, RunctlError(f"The run directory of {code(run.run_id)} is gone from {', '.join(missing)}."))
        return
    merged = torchrun.merge(run.node_ids, snaps)
    run.node_states = torchrun.node_states(run.node_ids, snaps)
    failed = None
    if merged.ended and merged.exit_code != 0:
        bad = [iid for iid, snap in snaps.items() if snap is not None and snap.exit_code not in (None, 0)]
        try:
            told = svc.fleet.run_many(bad, torchrun.failure_report(svc.settings.RUNCTL_REMOTE_ROOT, run.run_id))
        except RunctlError:
            told = {}
        reports = {iid: torchrun.parse_failure_report(res.stdout) for iid, res in told.items()}
        failed = torchrun.failure(run.node_ids, snaps, reports)
    if failed is not None:
        rank = f", rank {failed.rank}" if failed.rank is not None else ""
        said = f": {code(failed.exception)}" if failed.exception else ""
        run.failure = f"node {failed.node} ({failed.instance_id}{rank}) failed (exit {failed.exit_code}){said}"
    update(svc, run, merged)


def unreachable(svc: Services, run: Run, exc: RunctlError) -> None:
    """The instance did not answer: lost if it is gone or stopped, else try again later."""
    try:
        inst = svc.fleet.get(run.instance_id)
    except InstanceError as gone:
        lost(svc, run, gone)
        return
    except RunctlError:
        inst = None
    if inst is not None and inst.state not in ("running", "pending"):
        lost(svc, run, RunctlError(f"{inst.label} is `{inst.state}`.", why=exc.what))
        return
    log.warning("monitor %s: %s", run.run_id, exc.what)
    run.polls += 1
    svc.runs.save(run)
    schedule(svc, run.run_id, next_delay(svc, run.polls))


def update(svc: Services, run: Run, snap: Snapshot | None) -> None:
    current = svc.runs.get(run.run_id)
    if current is None or current.state.ended or current.state is RunState.STOPPING:
        return  # a stop flow owns the run now
    if snap is None or snap.missing:
        lost(svc, run, RunctlError(f"The run directory of {code(run.run_id)} is gone from the instance."))
        return
    before = run.checkpoint
    absorb(run, snap)
    if run.backup and (run.checkpoint != before or snap.ended):
        backup.queue_run(svc, run)
    watch_gpus(run, snap, svc.clock(), svc.settings.RUNCTL_GPU_IDLE_PERCENT)
    # Only a spot instance gets notices: on any other, the file is the training's own writing.
    if snap.spot_notice and not run.spot_notice and run.spot:
        run.spot_notice, run.spot_signalled_at = snap.spot_notice, snap.spot_signalled_at
        run.polls = 0  # the instance goes within two minutes: follow the checkpoint closely
        if run.auto_resume and not snap.ended:  # back up now, not after the exit: the stop will not wait
            backup.queue_run(svc, run)
    extend_all(svc.redis, run.node_ids, run.lock_token)
    if snap.ended:
        finish(svc, run, snap)
        return
    run.polls += 1
    if run.wait:
        publish(svc, run)
    else:
        svc.runs.save(run)
    delay = next_delay(svc, run.polls)
    schedule(svc, run.run_id, min(delay, SPOT_POLL_MAX) if run.spot else delay)


def finish(svc: Services, run: Run, snap: Snapshot) -> None:
    """The run ended on its own: record it, release the lock, tell the requester."""
    current = svc.runs.get(run.run_id)
    if current is not None and (current.state.ended or current.state is RunState.STOPPING):
        return  # a stop flow closes it (or already did)
    if not svc.runs.claim_end(run.run_id):
        return  # another tick, or the reconcile's monitor job, reports it
    event_keys.revoke(svc.redis, run.run_id)  # its events sign nothing more
    run.exit_code = snap.exit_code if snap.exit_code is not None else -1
    run.ended_at = svc.clock()
    run.ended_by = run.ended_by or "exit"
    run.state = ended_state(run.exit_code)
    release_all(svc.redis, run.node_ids, run.lock_token)
    told = summary.gather(svc, run)  # one SSM command: metrics, chart series, files, links; and the cost
    summary.keep(run, told)
    publish(svc, run)
    autostop.after_run(svc, run)
    took = duration((run.ended_at - (run.started_at or run.created_at)).total_seconds())
    more = told.more()
    if run.spot_notice:
        reply(svc, run, spot_report(run, f"ended (exit {run.exit_code}) after {took}") + more, full_log=True)
        summary.conclude(svc, run, told)
        auto_resume(svc, run)
        queued.after_end(svc, run)
        return
    ck = told.files() or (
        "Checkpoint: " + checkpoint_text(run.checkpoint, run.ended_at, absolute=True)
        if run.checkpoint
        else "No checkpoint was written."
    )
    ck += more
    if run.exit_code == 0:
        reply(svc, run, f":white_check_mark: run {code(run.run_id)} finished (exit 0) in {took}. {ck}", full_log=True)
    elif run.state is RunState.STOPPED:
        signame = STOP_SIGNALS[run.exit_code]
        reply(
            svc,
            run,
            f":double_vertical_bar: run {code(run.run_id)} was stopped by {signame} from outside runctl "
            f"(exit {run.exit_code}) after {took}. {ck}",
            full_log=True,
        )
    else:
        shown = "unknown (the process vanished)" if snap.exit_code is None else str(run.exit_code)
        tail = "\n".join(snap.log[-LOG_TAIL_LINES:]) or "(training.log is empty)"
        where = f" {run.failure}." if run.failure else ""
        reply(
            svc,
            run,
            f":x: run {code(run.run_id)} failed with exit code {shown} after {took}.{where} {ck}\n"
            f"Last lines of training.log:\n{block(tail[-2500:])}",
            full_log=True,
        )
    queued.after_end(svc, run)  # the next run in line starts (its own run dir: the summary may read on)
    summary.conclude(svc, run, told)


def lost(svc: Services, run: Run, exc: RunctlError) -> str:
    if not svc.runs.claim_end(run.run_id):
        return RunState.LOST.value  # someone else reports its end
    event_keys.revoke(svc.redis, run.run_id)
    run.state = RunState.LOST
    run.ended_by = "lost"
    run.ended_at = svc.clock()
    run.error = exc.info()
    release_all(svc.redis, run.node_ids, run.lock_token)
    publish(svc, run)
    lost_text = f":grey_question: lost track of run {code(run.run_id)}: {exc.what}"
    if run.spot_notice:  # AWS took the instance before a poll saw the training exit
        lost_text = spot_report(run, f"then runctl lost track of it: {exc.what}")
    reply(svc, run, lost_text, full_log=run.started_at is not None)
    autostop.after_run(svc, run)
    if run.spot_notice:
        summary.count_cost(svc, run)  # its instance's share of an `--auto-resume` run's cost
        auto_resume(svc, run)
    queued.after_end(svc, run)
    return run.state.value


def auto_resume(svc: Services, run: Run) -> None:
    """`--auto-resume`: a replacement continues the run (workers/jobs/spot.py)."""
    if run.auto_resume:
        enqueue(svc.queue, JobPath.SPOT_REPLACE, RunArgs(run_id=run.run_id), SYSTEM)


def spot_report(run: Run, ended: str) -> str:
    """ "spot interruption: checkpoint epoch N saved", or loudly that nothing was."""
    notice = spot.describe(run.spot_notice)
    if run.checkpoint is None:
        return (
            f":rotating_light: run {code(run.run_id)}: spot interruption ({notice}): no checkpoint was saved, "
            f"its progress is lost; the script needs a SIGTERM handler that saves. The training {ended}."
        )
    epoch = f"epoch {run.checkpoint.epoch}" if run.checkpoint.epoch is not None else code(run.checkpoint.name)
    signalled = run.spot_signalled_at
    # Whole seconds on both sides (`date -r`): a checkpoint of an earlier second predates the signal.
    if signalled is not None and run.checkpoint.modified_at < signalled:
        return (
            f":warning: run {code(run.run_id)}: spot interruption ({notice}): no checkpoint after the signal; "
            f"the newest is {epoch} ({code(run.checkpoint.name)}, saved before it), later progress is lost. "
            f"The training {ended}."
        )
    owner = run.checkpoint_run_id or run.run_id
    then = (
        " `--auto-resume`: a replacement continues it."
        if run.auto_resume
        else f" Continue elsewhere: `/runctl backup {run.instance_id} --run {owner}` while the instance lasts, "
        f"then `/runctl resume {run.run_id} --on <instance-id>`."
    )
    return (
        f":zap: run {code(run.run_id)}: spot interruption: checkpoint {epoch} saved "
        f"({code(run.checkpoint.name)}); the instance was told: {notice}. The training {ended}.{then}"
    )
