"""Benchmark 3: the train lock under contention.

Part 1, the lock itself: TRIALS trials; in each, 20 contenders (2 worker
processes x 10 threads, released together by a barrier) race for
`workers.state.locks.train_lock` on one instance against real Redis. The winner
holds the lock until every contender has tried, as a real run would. Prints
double starts (trials with more than one winner; must be 0), trials with no
winner, and p50/p99 acquire and release times.

Part 2, end to end: E2E_TRIALS trials through the real `train` job against the
sandbox. In each, 10 concurrent train jobs (4 with --smoke) for one instance
must start exactly one run; then the Redis lock key is deleted mid-run and 5
more (2) must all be refused: the first by the instance-side pid check, the
rest by the lock that one re-took.

    python bench/lock_race.py [--trials 1000] [--e2e-trials 20] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/lock_race.py`

import multiprocessing
import threading
import time
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from tempfile import TemporaryDirectory
from typing import Any

import redis as redis_mod

from bench import harness
from runctl_sandbox.aws import seed
from runctl_sandbox.example_repo import make_example_repo
from workers import remote, services
from workers.commands import Actor, TrainCommand
from workers.jobs.train import train
from workers.services import Services
from workers.state.locks import Holder, train_lock
from workers.state.runs import RunState

PROCESSES = 2
THREADS = 10
STARTS = "runctl:bench:starts"  # hash: trial -> number of winners
BARRIER_SECONDS = 60

Timing = tuple[list[float], list[float]]  # acquire ms, release ms


def contender(barrier: Barrier, trials: int, who: str, out: list[Timing], errors: list[str]) -> None:
    redis = redis_mod.Redis.from_url(harness.REDIS_URL)
    acquires: list[float] = []
    releases: list[float] = []
    try:
        for trial in range(trials):
            lock = train_lock(redis, f"i-bench{trial:05d}")
            token = Holder(run_id=f"r-{trial}-{who}", user_id="U0ALICE", since=datetime.now(UTC)).token()
            barrier.wait(BARRIER_SECONDS)
            started = time.perf_counter()
            won = lock.acquire(token)
            acquires.append((time.perf_counter() - started) * 1000)
            if won:
                redis.hincrby(STARTS, str(trial), 1)
            barrier.wait(BARRIER_SECONDS)  # everyone has tried; only now may the winner let go
            if won:
                started = time.perf_counter()
                if not lock.release(token):
                    raise RuntimeError(f"trial {trial}: the winner {who} could not release its own lock")
                releases.append((time.perf_counter() - started) * 1000)
    except Exception as exc:  # one contender down must not leave the others waiting for ever
        barrier.abort()
        errors.append(f"{who}: {type(exc).__name__}: {exc}")
    out.append((acquires, releases))


def worker_process(barrier: Barrier, trials: int, index: int, results: Any) -> None:
    out: list[Timing] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=contender, args=(barrier, trials, f"p{index}t{n}", out, errors)) for n in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((out, errors))


def lock_only(trials: int) -> dict[str, harness.Figure]:
    redis = harness.bench_redis()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES * THREADS)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker_process, args=(barrier, trials, i, results)) for i in range(PROCESSES)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    timings: list[Timing] = []
    errors: list[str] = []
    for _ in procs:
        out, failed = results.get(timeout=600)
        timings += out
        errors += failed
    for p in procs:
        p.join()
    if errors:
        raise SystemExit("lock race aborted (is something else using Redis db 15?):\n" + "\n".join(errors[:5]))
    wall = time.perf_counter() - started
    winners = {int(k): int(v) for k, v in redis.hgetall(STARTS).items()}
    redis.flushdb()
    acquires = [ms for a, _ in timings for ms in a]
    releases = [ms for _, r in timings for ms in r]
    return {
        "trials": trials,
        "contenders_per_trial": PROCESSES * THREADS,
        "double_starts": sum(1 for n in winners.values() if n > 1),
        "trials_without_start": trials - len(winners),
        "acquire_p50_ms": round(harness.percentile(acquires, 50), 3),
        "acquire_p99_ms": round(harness.percentile(acquires, 99), 3),
        "release_p50_ms": round(harness.percentile(releases, 50), 3),
        "release_p99_ms": round(harness.percentile(releases, 99), 3),
        "lock_wall_seconds": round(wall, 2),
    }


ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
LONG_RUN = ("--epochs", "500", "--step-seconds", "0.05")


def race(svc: Services, iid: str, trial: int, phase: str, count: int) -> list[tuple[str, RunState, str]]:
    """`count` train jobs for `iid` at once; (run id, state, error text) of each."""
    barrier = threading.Barrier(count)
    run_ids = [f"r-e2e-{trial:03d}-{phase}-{n:02d}" for n in range(count)]

    def job(run_id: str) -> None:
        cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=LONG_RUN)
        barrier.wait()
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)

    threads = [threading.Thread(target=job, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    out = []
    for run_id in run_ids:
        run = svc.runs.get(run_id)
        if run is None:
            raise SystemExit(f"{run_id} left no run record")
        out.append((run_id, run.state, run.error.what if run.error else ""))
    return out


def end_to_end(trials: int, racers: int, later: int) -> dict[str, harness.Figure]:
    redis = harness.bench_redis()
    double = second = by_instance = 0
    with harness.sandbox() as box, harness.fake_slack() as slack, TemporaryDirectory() as tmp:
        repo = make_example_repo(Path(tmp) / "training-code")
        config = harness.settings(
            slack, RUNCTL_REPO=str(repo), RUNCTL_MIRROR_DIR=Path(tmp) / "mirror", RUNCTL_LAUNCH_CHECK_SECONDS=0.5
        )
        svc = harness.services(config, redis, slack)
        services.install(svc)
        try:
            iid = seed(box.endpoint_url, box.region, harness.BUCKET).instances["gpu-box-1"]
            svc.repo.sync()  # warm the mirror so the race is about the lock
            root = config.RUNCTL_REMOTE_ROOT
            for trial in range(trials):
                first = race(svc, iid, trial, "race", racers)
                running = [run_id for run_id, state, _ in first if state is RunState.RUNNING]
                double += max(0, len(running) - 1)
                if not running:
                    raise SystemExit(f"trial {trial}: no run started: {first}")
                redis.delete(train_lock(redis, iid).key)  # Redis lost the lock mid-run
                after = race(svc, iid, trial, "nolock", later)
                second += sum(1 for _, state, _ in after if state is not RunState.REFUSED)
                by_instance += sum(1 for _, _, what in after if running[0] in what)
                for run_id in running:
                    svc.fleet.run(iid, remote.stop_run(root, run_id, 10), 60)
                redis.delete(train_lock(redis, iid).key)
        finally:
            services.install(None)
            redis.flushdb()
    return {
        "e2e_trials": trials,
        "e2e_double_starts": double,
        "e2e_second_runs_without_redis_lock": second,
        "e2e_refused_by_instance_check": by_instance,
        "e2e_racers_per_trial": racers,
        "e2e_jobs_after_key_deleted": trials * later,
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "20 lock trials; 1 end-to-end trial of 4 + 2 train jobs")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--e2e-trials", type=int, default=20)
    args = parser.parse_args(argv)
    trials, e2e = (20, 1) if args.smoke else (args.trials, args.e2e_trials)
    figures = lock_only(trials)
    figures.update(end_to_end(e2e, 4, 2) if args.smoke else end_to_end(e2e, 10, 5))
    harness.report(
        "lock_race",
        figures,
        {
            "double_starts": "= 0",
            "trials_without_start": "= 0",
            "e2e_double_starts": "= 0",
            "e2e_second_runs_without_redis_lock": "= 0",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
