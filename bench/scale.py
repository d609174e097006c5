"""Benchmark 12: many live runs in one workspace, run events on, Slack's budgets enforced.

N live runs (default 500) spread over C channels (default 20; `--channels 1` puts them all in
one) send signed progress events every RUNCTL_EVENTS_PROGRESS_SECONDS (15 s, with jitter)
to the real WSGI app's `/runctl/events` (bot/web.py on a local port), from an event
generator (a thread pool, not N processes). The real event, monitor and reply jobs run in
RQ workers in this process (`InlineWorker` threads, `--workers`, default 2, as the
Procfile's two quick workers), against real Redis and the fake Slack Web API, which answers
429 with Retry-After past Slack's published budgets (runctl_sandbox.fake_slack:
chat.update 50 a minute per workspace, chat.postMessage 1 a second per channel). The
instance side is a fast fake: one local directory holds every run's `runs/<id>/` files
(pid, exit_code, progress.json) and a "SendCommand" runs the real status script on it
under /bin/sh, so the monitor's polls and the exit events' polls parse real output; it
counts the calls a real SSM would get (one SendCommand and one read per 50 instances).
Every run's instance exists in the sandbox (moto + the executing-SSM shim: bench/scale_jobs.py),
which answers everything else (an instance's description, the bucket).

Before the window, with the N runs live, the real sweep (twice), digest and reconcile run once
each against the sandbox: their wall time, AWS calls by API and Slack calls (bench/scale_jobs.py).

During the window (`--minutes`, default 3 of real time) `--ends` runs (default 10 % of
them) exit at random times, and with `--burst-ends B` (default 50 with one channel) B of
them end within `--burst-seconds` (default 60: the same minute). Each exit writes `exit_code`, stops the run's pid and
POSTs its exit event, as the wrapper does.

Figures:
- Slack calls and 429s per method (target: 0 429s);
- exit → thread reply ("finished" in the run's thread): p50 / p95 / max, and for the burst
  the order and lag of each;
- parent staleness, fair rotation: per live run, the longest gap between its parent's
  updates in the window (and, for a run never updated, the whole window), p50 / p95 / max,
  against the arithmetic floor runs ÷ update budget; the same for watched runs (status
  asked: `updates.watch`);
- progress states dropped as stale (replaced while waiting), never an end;
- events answered 202 / 429 at the web, accepted per second;
- the workers' CPU per run-hour, Redis memory per live run, SSM calls per run-hour, the jobs run;
- the sweep, digest and reconcile: seconds, AWS calls by API, Slack calls by method.

    python bench/scale.py [--runs 500] [--channels 20] [--minutes 3] [--ends N] [--burst-ends B]
                          [--burst-seconds S] [--workers 2] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/scale.py`

import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from tempfile import TemporaryDirectory
from typing import Any

from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry

from bench import harness, scale_jobs
from bot.web import wsgi
from runctl_sandbox.aws import MANAGED_TAG
from runctl_sandbox.fake_slack import DEFAULT_BUDGETS, FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.web import WebServer
from workers import services
from workers.aws.fleet import Fleet
from workers.aws.instance import ScriptResult
from workers.queueing import QUEUES
from workers.slack import updates
from workers.slack.thread import open_run
from workers.state import event_keys, polls
from workers.state.runs import Run, RunState

INSTANCES_PER_COMMAND = 50  # SSM SendCommand takes 50 targets; one read per command
OPS = "C0OPS"  # RUNCTL_CHANNEL (harness.settings): the digest's channel


class FastFleet(Fleet):
    """The instance side, fast: every instance's RUNCTL_ROOT is one local directory (each
    run's directory there links to the one on its instance in the sandbox), and a command is
    the real script run there under /bin/sh. Counts what SSM would be sent. Anything but a
    command (an instance's description, the bucket) is the sandbox's, as for the jobs."""

    def __init__(self, root: Path) -> None:
        super().__init__((MANAGED_TAG, "true"), harness.BUCKET)
        self.root = root
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def run_many(
        self, instance_ids: list[str], script: str, timeout: int = 120, first_poll: float = 0.1
    ) -> dict[str, ScriptResult]:
        commands = math.ceil(len(instance_ids) / INSTANCES_PER_COMMAND)
        with self.lock:
            self.calls["ssm:SendCommand"] += commands
            self.calls["ssm:read result"] += commands
        proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=timeout, check=False)
        return {
            iid: ScriptResult(iid, "Success" if proc.returncode == 0 else "Failed", proc.returncode, proc.stdout, "")
            for iid in instance_ids
        }

    def run(self, instance_id: str, script: str, timeout: int = 120, first_poll: float = 0.1) -> ScriptResult:
        return self.run_many([instance_id], script, timeout, first_poll)[instance_id]


@dataclass
class Sim:
    """One simulated run: what its instance has, and when it ended."""

    run_id: str
    channel: str
    key: str
    run_dir: Path
    epoch: int = 0
    ends_at: float | None = None  # monotonic
    exited_at: float | None = None
    watched: bool = False
    answers: Counter[int] = field(default_factory=Counter)


def post_event(url: str, sim: Sim, kind: str, progress: dict[str, Any] | None = None) -> int:
    event: dict[str, Any] = {"run_id": sim.run_id, "kind": kind, "ts": int(time.time()), "nonce": secrets.token_hex(16)}
    if progress is not None:
        event["progress"] = progress
    body = json.dumps(event).encode()
    sig = "v1=" + hmac.new(sim.key.encode(), b"v1:" + body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Runctl-Run": sim.run_id, "X-Runctl-Signature": sig}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def db_bytes(redis: Any) -> int:
    """MEMORY USAGE summed over this db's keys (the server's used_memory counts other dbs too)."""
    total = 0
    for key in redis.scan_iter(count=1000):
        total += int(redis.memory_usage(key) or 0)
    return total


def jobs_run(redis: Any) -> str:
    """The jobs the workers finished, by function (`monitor.tick=310 events.event=1200`): those
    of the last 10 minutes (RQ keeps a system job's result for 600 s), so all of a short window's."""
    done: Counter[str] = Counter()
    for name in QUEUES:
        queue = Queue(name, connection=redis)
        ids = FinishedJobRegistry(queue=queue).get_job_ids()
        for job in Job.fetch_many(ids, connection=redis):
            if job is not None:
                done[".".join(str(job.func_name).split(".")[-2:])] += 1
    return " ".join(f"{name}={n}" for name, n in done.most_common())


def task_cpu_seconds(native_id: int | None) -> float:
    """utime + stime of one thread of this process, from /proc."""
    if native_id is None:
        return 0.0
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "20 runs over 2 channels for 30 s, 4 ends")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=3.0, help="the measured window, real time")
    parser.add_argument("--ends", type=int, default=None, help="runs that end in the window (default 10 %%)")
    parser.add_argument("--burst-ends", type=int, default=None, help="of those, how many in one burst")
    parser.add_argument("--burst-seconds", type=float, default=60.0, help="the burst's length (default a minute)")
    parser.add_argument("--workers", type=int, default=2, help="in-process RQ workers")
    parser.add_argument("--seed", type=int, default=28)
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.channels, args.minutes, args.ends, args.burst_ends = 20, 2, 0.5, 4, 2
    n, window = args.runs, args.minutes * 60.0
    ends = args.ends if args.ends is not None else max(1, n // 10)
    burst = args.burst_ends if args.burst_ends is not None else (min(50, ends) if args.channels == 1 else 0)
    rng = random.Random(args.seed)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per event
    channels = [f"C0SCALE{i:02d}" for i in range(args.channels)]

    redis = harness.bench_redis()
    mem_empty = db_bytes(redis)
    slack = FakeSlack(member_of=[*channels, OPS], budgets=DEFAULT_BUDGETS)
    slack.start()
    with TemporaryDirectory(prefix="runctl-scale-") as tmp, harness.sandbox() as box:
        root = Path(tmp)
        instance_ids = scale_jobs.fleet_of(box, n)
        config = harness.settings(slack, RUNCTL_REMOTE_ROOT=str(root), RUNCTL_EVENTS_URL="http://127.0.0.1:1/unused")
        svc = harness.services(config, redis, slack)
        fleet = FastFleet(root)
        svc._fleet = fleet
        services.install(svc)
        sims: list[Sim] = []
        # The parents, posted before the window (outside the per-channel budget: a launch's
        # post is not what this measures).
        slack.budget("chat.postMessage", None)
        started = datetime.now(UTC) - timedelta(minutes=30)
        for i in range(n):
            run_id = f"r-scale-{i:04d}"
            channel = channels[i % len(channels)]
            run = Run(
                run_id=run_id,
                instance_id=instance_ids[i],
                user_id=f"U0USER{i % 40:02d}",
                channel_id=channel,
                script="train.py",
                state=RunState.RUNNING,
                started_at=started,
                created_at=started,
                lock_token="bench",
                polls=12,  # followed for 30 minutes: the monitor's backoff is at its maximum
            )
            run_dir = scale_jobs.run_dir(box, root, run)
            (run_dir / "pid").write_text(f"{os.getpid()}\n")  # alive while this process is
            scale_jobs.launched(svc, open_run(svc, svc.runs.create(run)), run_dir, datetime.now(UTC))
            polls.schedule(svc, run_id, timedelta(seconds=config.RUNCTL_POLL_MAX_SECONDS * rng.random()))
            sims.append(Sim(run_id, channel, event_keys.issue(redis, run_id), run_dir))
        slack.budget("chat.postMessage", DEFAULT_BUDGETS["chat.postMessage"])
        mem_live = db_bytes(redis)
        jobs = scale_jobs.measure(svc, slack, n)  # before the window: its Slack calls are not the window's
        watched = rng.sample(sims, min(10, n))
        ending = rng.sample(sims, min(ends, n))
        t0 = time.monotonic() + 5  # the generator starts 5 s into the window's warm-up
        for k, sim in enumerate(ending):
            if k < burst:
                sim.ends_at = t0 + window * 0.4 + args.burst_seconds * k / max(1, burst)  # B ends in the burst
            else:
                sim.ends_at = t0 + rng.uniform(window * 0.1, window * 0.9)
        setup_done = time.monotonic()  # Slack calls before this posted the parents
        answers: Counter[int] = Counter()
        answers_lock = threading.Lock()
        stop = threading.Event()
        with WebServer(wsgi(config, redis)) as web:
            workers = [InlineWorker(redis) for _ in range(args.workers)]
            for worker in workers:
                worker.start(interval=0.05)
            cpu_before = sum(task_cpu_seconds(w._thread.native_id if w._thread else None) for w in workers)
            pool = ThreadPoolExecutor(max_workers=16)

            def progress(sim: Sim) -> None:
                sim.epoch += 1
                body = {"epoch": sim.epoch, "total_epochs": 1000, "metrics": {"loss": round(1 / sim.epoch, 4)}}
                (sim.run_dir / "progress.json").write_text(json.dumps(body))
                status = post_event(web.events_url, sim, "progress", body)
                with answers_lock:
                    answers[status] += 1

            def exit_(sim: Sim) -> None:
                (sim.run_dir / "exit_code").write_text("0\n")
                (sim.run_dir / "pid").write_text("999999999\n")  # no such process: not alive
                sim.exited_at = time.monotonic()
                status = post_event(web.events_url, sim, "exit")
                with answers_lock:
                    answers[status] += 1

            def generate() -> None:
                period = float(config.RUNCTL_EVENTS_PROGRESS_SECONDS)
                nxt = {s.run_id: t0 + rng.uniform(0, period) for s in sims}
                while not stop.is_set():
                    now = time.monotonic()
                    for sim in sims:
                        if sim.exited_at is not None:
                            continue
                        if sim.ends_at is not None and now >= sim.ends_at:
                            sim.exited_at = now
                            pool.submit(exit_, sim)
                        elif now >= nxt[sim.run_id]:
                            nxt[sim.run_id] = now + period * rng.uniform(0.9, 1.1)
                            pool.submit(progress, sim)
                    for sim in watched:  # someone asks their status now and then
                        if rng.random() < 0.01:
                            updates.watch(svc, sim.run_id)
                    stop.wait(0.1)

            generator = threading.Thread(target=generate, name="events", daemon=True)
            generator.start()
            time.sleep(max(0.0, t0 - time.monotonic()) + window)
            stop.set()
            generator.join(10)
            pool.shutdown(wait=True)
            settle = time.monotonic() + 60  # the ends already sent get their replies
            while time.monotonic() < settle and not _all_replied(slack, svc, ending):
                time.sleep(0.5)
            cpu = sum(task_cpu_seconds(w._thread.native_id if w._thread else None) for w in workers) - cpu_before
            for worker in workers:
                worker.stop()
        services.install(None)
        mem_end = db_bytes(redis)
        done = jobs_run(redis)
        figures = _figures(
            slack,
            svc,
            sims,
            ending,
            watched,
            burst,
            answers,
            fleet,
            window,
            (setup_done, t0),
            cpu,
            config.RUNCTL_SLACK_UPDATES_PER_MINUTE,
        )
        if burst:
            figures["burst_seconds"] = args.burst_seconds
        figures["redis_bytes_per_live_run"] = round((mem_live - mem_empty) / n)
        figures["redis_bytes_window_growth_per_run"] = round((mem_end - mem_live) / n)
        figures["jobs_run"] = done
        figures.update(jobs)
    slack.stop()
    if not os.environ.get("SCALE_KEEP"):
        redis.flushdb()
    harness.report(
        "scale",
        {"runs": n, "channels": args.channels, "window_s": round(window), "workers": args.workers, **figures},
        {"slack_429": "= 0", "end_to_reply_p95_s": "≤ 5", "ends_not_replied": "= 0"},
    )
    return 0


def _reply_at(slack: FakeSlack, svc: services.Services, sim: Sim) -> float | None:
    run = svc.runs.get(sim.run_id)
    if run is None or run.message_ts is None:
        return None
    for call in slack.calls_to("chat.postMessage"):
        if call.error is None and call.params.get("thread_ts") == run.message_ts and "finished" in str(call.params):
            return call.at
    return None


def _all_replied(slack: FakeSlack, svc: services.Services, ending: list[Sim]) -> bool:
    return all(_reply_at(slack, svc, s) is not None for s in ending if s.exited_at is not None)


def _figures(
    slack: FakeSlack,
    svc: services.Services,
    sims: list[Sim],
    ending: list[Sim],
    watched: list[Sim],
    burst: int,
    answers: Counter[int],
    fleet: FastFleet,
    window: float,
    times: tuple[float, float],
    cpu: float,
    per_minute: float,
) -> dict[str, harness.Figure]:
    setup_done, t0 = times
    calls = [c for c in slack.calls if c.at >= setup_done]
    figures: dict[str, harness.Figure] = {}
    by_method: Counter[str] = Counter(c.method for c in calls)
    limited: Counter[str] = Counter(c.method for c in calls if c.error == "ratelimited")
    figures["slack_429"] = sum(limited.values())
    for method in ("chat.update", "chat.postMessage"):
        figures[f"{method}_calls"] = by_method[method]
        figures[f"{method}_429"] = limited[method]
    figures["chat.update_per_minute"] = round(  # in the window only (the settle after it is shorter)
        sum(1 for c in calls if c.method == "chat.update" and not c.error and t0 <= c.at <= t0 + window)
        / (window / 60),
        1,
    )
    # exit -> reply
    lags: list[tuple[float, Sim]] = []
    missing = 0
    for sim in ending:
        if sim.exited_at is None:
            continue
        at = _reply_at(slack, svc, sim)
        if at is None:
            missing += 1
        else:
            lags.append((at - sim.exited_at, sim))
    values = [lag for lag, _ in lags]
    figures["ends"] = len(lags) + missing
    figures["ends_not_replied"] = missing
    figures["end_to_reply_p50_s"] = round(harness.percentile(values, 50), 2)
    figures["end_to_reply_p95_s"] = round(harness.percentile(values, 95), 2)
    figures["end_to_reply_max_s"] = round(max(values, default=0.0), 2)
    if burst:
        burst_lags = sorted((s.exited_at or 0.0, lag) for lag, s in lags if s in ending[:burst])
        figures["burst_ends"] = burst
        figures["burst_lag_each_s"] = " ".join(f"{lag:.1f}" for _, lag in burst_lags)
        figures["burst_lag_max_s"] = round(max((lag for _, lag in burst_lags), default=0.0), 2)
    # parent staleness: the longest gap between a live run's parent updates in the window
    start, end = t0, t0 + window
    ts_of = {}
    for sim in sims:
        run = svc.runs.get(sim.run_id)
        if run is not None and run.message_ts:
            ts_of[run.message_ts] = sim
    stamps: dict[str, list[float]] = {s.run_id: [] for s in sims}
    for call in calls:
        if call.method == "chat.update" and not call.error and start <= call.at <= end:
            owner = ts_of.get(str(call.params.get("ts")))
            if owner is not None:
                stamps[owner.run_id].append(call.at)

    def longest_gap(sim: Sim) -> float:
        stop = min(end, sim.exited_at or end)
        points = [start, *stamps[sim.run_id], stop]
        return max(b - a for a, b in itertools.pairwise(points))

    live = [s for s in sims if s not in ending]
    gaps = [longest_gap(s) for s in live]
    figures["parent_gap_p50_s"] = round(harness.percentile(gaps, 50), 1)
    figures["parent_gap_p95_s"] = round(harness.percentile(gaps, 95), 1)
    figures["parent_gap_max_s"] = round(max(gaps, default=0.0), 1)
    figures["parent_gap_floor_s"] = round(len(sims) / per_minute * 60, 1)
    figures["runs_never_updated_in_window"] = sum(1 for s in live if not stamps[s.run_id])
    seen = [longest_gap(s) for s in watched if s not in ending]
    figures["watched_gap_max_s"] = round(max(seen, default=0.0), 1)
    stats = {updates._text(k): int(v) for k, v in svc.redis.hgetall(updates.STATS).items()}
    figures["updates_sent_end/watched/rest"] = "/".join(str(stats.get(f"sent:{b}", 0)) for b in (0, 1, 2))
    figures["stale_progress_dropped"] = stats.get("superseded", 0)
    # the web's answers to the generator
    figures["events_202"] = answers[202]
    figures["events_429"] = answers[429]
    figures["events_other"] = sum(v for k, v in answers.items() if k not in (202, 429))
    figures["events_accepted_per_s"] = round(answers[202] / window, 1)
    # the workers' CPU and SSM calls, per run-hour
    run_hours = sum(min(end, s.exited_at or end) - start for s in sims) / 3600
    figures["worker_cpu_s"] = round(cpu, 1)
    figures["worker_cpu_s_per_run_hour"] = round(cpu / run_hours, 2) if run_hours else 0.0
    figures["ssm_calls"] = sum(fleet.calls.values())
    figures["ssm_calls_per_run_hour"] = round(sum(fleet.calls.values()) / run_hours, 2) if run_hours else 0.0
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
