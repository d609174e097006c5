"""The reconcile: the instance is the truth, and Redis is healed from it.

The clock queues it every RUNCTL_RECONCILE_SECONDS. It asks every managed running
instance (one SSM command per 50, `workers.remote.reconcile`) which runs it has and
compares with Redis:

- a live run Redis does not know is re-adopted: its record rebuilt from `meta.json`, its
  train lock retaken, its monitoring resumed, and its thread told. Only a `meta.json` the
  bot signed (workers/state/records.py) for that run directory on that very instance is
  adopted: an instance's word is evidence about its processes, never about who or where.
  Anything else is ignored and audited once a day;
- an ended run whose end was never reported, and a run Redis thinks is live that nobody
  follows, go back to the monitor, whose next poll reports the end (or the loss) once;
- a train lock with no live run behind it is released.

Two passes at once are safe: a pass claims the reconcile, every adoption is a SET NX of
the run's record, and an end is reported only by whoever claims it (`RunStore.claim_end`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from workers import audit
from workers.errors import RunctlError, Throttled
from workers.jobs import funnel, queued
from workers.remote.reconcile import Report, SeenRun, parse_report, runs_report
from workers.services import Services, current
from workers.slack.thread import reply
from workers.state import polls, records
from workers.state.locks import Holder, acquire_all, op_lock, train_lock
from workers.state.runs import RUN_ID, Run, RunMeta, RunState

log = logging.getLogger(__name__)

CLAIM = "runctl:reconcile:claim"
CLAIM_SECONDS = 600  # a pass that died frees the claim by then
FLEET = "runctl:reconcile:fleet"  # the managed running instances, cached
FLEET_SECONDS = 600
IGNORED = "runctl:reconcile:ignored:"  # + instance + digest of the directory name: audited once a day
MARKED = "runctl:reconcile:marked"  # zset: run id -> when its end was marked reported on its instance
REPORT_WINDOW = timedelta(hours=24)  # an end older than this, never reported, is left alone
BATCH = 50  # SendCommand targets at most 50 instances
SSM_TIMEOUT = 60
FIRST_POLL = 1.0

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Tally:
    instances: int = 0
    adopted: list[str] = field(default_factory=list)
    followed: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.instances} instance(s); adopted {len(self.adopted)}, back to the monitor "
            f"{len(self.followed)}, locks released {len(self.released)}"
        )


@funnel.system("reconcile")
def reconcile() -> str:
    svc = current()
    token = secrets.token_hex(8)
    if not svc.redis.set(CLAIM, token, nx=True, ex=CLAIM_SECONDS):
        return "another reconcile is running"
    try:
        return str(run_pass(svc))
    finally:
        svc.redis.eval(_RELEASE, 1, CLAIM, token)


def run_pass(svc: Services) -> Tally:
    tally = Tally()
    ids = managed(svc)
    tally.instances = len(ids)
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        for iid, report in ask(svc, batch).items():
            heal(svc, iid, report, tally)
    # Runs Redis thinks are live on instances not asked (stopped, unreachable): followed?
    for run in svc.runs.live():
        if run.run_id not in tally.followed and run.run_id not in tally.adopted:
            follow(svc, run, None, tally, asked=run.instance_id in ids)
    upcoming = svc.redis.zrange(polls.DUE, 0, 0, withscores=True)
    lapsing = svc.redis.zrange(polls.LEASED, 0, 0, withscores=True)
    times = [float(found[0][1]) for found in (upcoming, lapsing) if found]
    if times:  # the monitor's scheduled tick may be gone with the keys
        polls.ensure_tick(svc, min(times))
    queued.fallback(
        svc, load=True, running=ids
    )  # after the heal: a queue read back from S3 waits for the runs re-adopted
    return tally


def managed(svc: Services) -> list[str]:
    """Managed running instances: one DescribeInstances per 1000, at most every FLEET_SECONDS."""
    now = svc.clock().timestamp()
    cached = svc.redis.get(FLEET)
    if cached:
        seen = json.loads(cached)
        if now - float(seen["at"]) < FLEET_SECONDS:
            return [str(i) for i in seen["ids"]]
    ids = sorted(inst.id for inst in svc.fleet.iter_instances() if inst.state == "running")
    svc.redis.set(FLEET, json.dumps({"at": now, "ids": ids}), ex=FLEET_SECONDS)
    return ids


def ask(svc: Services, batch: list[str]) -> dict[str, Report]:
    """Each instance's report; an instance that cannot answer is left out (asked next pass)."""
    marks = to_mark(svc, batch)
    script = runs_report(svc.settings.RUNCTL_REMOTE_ROOT, [r for ids in marks.values() for r in ids])
    try:
        results = svc.fleet.run_many(batch, script, timeout=SSM_TIMEOUT, first_poll=FIRST_POLL)
    except Throttled:
        return {}
    except RunctlError as exc:
        if len(batch) == 1:
            log.warning("reconcile: %s did not answer: %s", batch[0], exc.what)
            return {}
        found: dict[str, Report] = {}
        for iid in batch:  # one bad instance fails the whole SendCommand: ask one by one
            found.update(ask(svc, [iid]))
        return found
    reports = {iid: parse_report(res.stdout) for iid, res in results.items() if res.ok}
    done = {rid: svc.clock().timestamp() for iid in reports for rid in marks.get(iid, [])}
    if done:
        svc.redis.zadd(MARKED, done)
        svc.redis.zremrangebyscore(MARKED, "-inf", svc.clock().timestamp() - 2 * REPORT_WINDOW.total_seconds())
    return reports


def to_mark(svc: Services, batch: Iterable[str]) -> dict[str, list[str]]:
    """Per instance, the recent runs Redis has seen end and not yet marked on the instance."""
    since = svc.clock() - REPORT_WINDOW
    recent: dict[str, list[str]] = {}
    candidates: list[tuple[str, Run]] = []
    for iid in batch:
        for run in svc.runs.history(iid, 50):
            if run.state.ended and (run.ended_at or run.created_at) >= since:
                candidates.append((iid, run))
    if not candidates:
        return recent
    scores = svc.redis.zmscore(MARKED, [r.run_id for _, r in candidates])
    for (iid, run), score in zip(candidates, scores, strict=True):
        if score is None:
            recent.setdefault(iid, []).append(run.run_id)
    return recent


def heal(svc: Services, iid: str, report: Report, tally: Tally) -> None:
    live: set[str] = set()
    key = records.record_key(svc.settings)
    for seen in report.runs:
        if not RUN_ID.fullmatch(seen.run_id):
            ignore(svc, iid, seen.run_id, "not a runctl run id")
            continue
        if seen.seen == "ended" and seen.ended_at and report.now and report.now - seen.ended_at > REPORT_WINDOW:
            continue
        record = svc.runs.get(seen.run_id)
        if record is not None and iid not in record.node_ids:
            continue  # another instance's run (a multi-node run's nodes are all its own): no evidence about it
        if record is None:
            if seen.meta is None or seen.seen == "starting":
                continue  # its train job is still launching it (and will save its record)
            try:
                meta = records.verified_meta(key, seen.meta, seen.run_id, iid)
            except records.Forged as forged:
                ignore(svc, iid, seen.run_id, str(forged))
                continue
            adopt(svc, iid, seen, meta, tally)
        elif not record.state.ended:
            follow(svc, record, seen, tally)
        if seen.seen == "live":
            live.add(seen.run_id)
    release_stale_lock(svc, iid, live, tally)


def ignore(svc: Services, iid: str, name: str, why: str) -> None:
    """A run directory the reconcile will not adopt: logged, and audited once a day."""
    log.warning("reconcile: ignored run directory %r on %s: %s", name[:100], iid, why)
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    if svc.redis.set(f"{IGNORED}{iid}:{digest}", "1", nx=True, ex=86400):
        outcome = f"reconcile: ignored run directory {name[:80]!a} on {iid}: {why}"
        entry = audit.of(funnel.SYSTEM, "refused", outcome, instance=iid)
        audit.record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, entry)


def adopt(svc: Services, iid: str, seen: SeenRun, meta: RunMeta, tally: Tally) -> None:
    """A run the instance has and Redis does not: rebuild it from its signed meta and hand it to
    the monitor. Any node of a multi-node run may report it first: the run comes back whole."""
    run = meta.rebuild()
    if not svc.runs.adopt(run):
        return  # another pass adopted it
    svc.runs.also_on(run, run.nodes[1:])
    now = svc.clock()
    if seen.seen == "live":
        holder = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=run.started_at or now)
        if acquire_all(svc.redis, run.node_ids, holder.token()) is None:  # every node's lock, or none
            run.lock_token = holder.token()
            svc.runs.save(run)
        reply(svc, run, f":recycle: runctl lost track of this run at {now:%H:%M} UTC and picked it up again.")
    log.warning("reconcile: adopted %s on %s (%s)", run.run_id, iid, seen.seen)
    tally.adopted.append(run.run_id)
    polls.schedule(svc, run.run_id, timedelta(0))


def follow(svc: Services, run: Run, seen: SeenRun | None, tally: Tally, asked: bool = True) -> None:
    """A run Redis thinks is live: make sure the monitor follows it."""
    if run.state is RunState.STOPPING or op_lock(svc.redis, run.instance_id).raw() is not None:
        return  # a stop, or its own train flow, owns it now
    if run.state in (RunState.QUEUED, RunState.STARTING, RunState.SETTING_UP):
        if seen is None or seen.seen == "starting":
            return  # not launched: the train job (or RQ's failure handling) answers for it
        # Its train job died after the launch; the instance has the run.
        run.state = RunState.RUNNING
        run.started_at = run.started_at or svc.clock()
        svc.runs.save(run)
    if polls.followed(svc, run.run_id):
        return
    if not asked and run.state is not RunState.RUNNING:
        return
    log.warning("reconcile: %s was followed by nobody", run.run_id)
    tally.followed.append(run.run_id)
    polls.schedule(svc, run.run_id, timedelta(0))


def release_stale_lock(svc: Services, iid: str, live: set[str], tally: Tally) -> None:
    lock = train_lock(svc.redis, iid)
    raw, holder = lock.raw(), lock.holder()
    if raw is None or holder is None or holder.run_id in live:
        return
    if op_lock(svc.redis, iid).raw() is not None:
        return  # a train or stop is under way
    record = svc.runs.get(holder.run_id)
    if record is not None and not record.state.ended:
        return  # live in Redis: the monitor reports it and releases the lock
    if lock.release(raw):
        log.warning("reconcile: released the train lock of %s (run %s is not live)", iid, holder.run_id)
        tally.released.append(iid)
