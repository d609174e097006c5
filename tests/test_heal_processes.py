"""Never lose track of a run, with real processes: the Procfile's `worker` and `clock`
(rq), real Redis, moto + the executing-SSM shim, the fake Slack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_mod
from rq import Queue

from workers.commands import Actor, TrainCommand
from workers.queueing import QUEUE, enqueue
from workers.sandbox.aws import Sandbox, SeedInfo
from workers.sandbox.fake_slack import FakeSlack
from workers.state.runs import RunStore

from .procs import Procs

pytestmark = pytest.mark.slow

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
BOB = Actor(user_id="U0BOB", channel_id="C0TRAIN")
RECONCILE_SECONDS = 5


@pytest.fixture
def procs(
    real_redis: redis_mod.Redis, sandbox: Sandbox, slack: FakeSlack, example_repo: Path, tmp_path: Path
) -> Iterator[Procs]:
    slack.reset()
    running = Procs(sandbox, slack, example_repo, tmp_path, RUNCTL_RECONCILE_SECONDS=str(RECONCILE_SECONDS))
    yield running
    running.stop()


def wait(condition: Callable[[], object], what: str, procs: Procs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{procs.output()}")
        time.sleep(0.05)


def queue_train(r: redis_mod.Redis, iid: str, who: Actor, *args: str) -> str:
    run_id = f"r-proc-{uuid.uuid4().hex[:10]}"
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
    enqueue(Queue(QUEUE, connection=r), cmd, who, run_id)
    return run_id


def thread(slack: FakeSlack, ts: str) -> list[str]:
    return [m.text for m in slack.thread("C0TRAIN", ts)]


def test_flushall_mid_run_a_second_train_is_refused_and_the_end_is_reported_in_the_thread(
    procs: Procs, real_redis: redis_mod.Redis, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    procs.start("worker")
    procs.start("clock")
    iid = fleet_seed.instances["gpu-box-1"]
    run_dir = sandbox.instance_dir(iid) / "runs"
    run_id = queue_train(real_redis, iid, ALICE, "--epochs", "10", "--steps-per-epoch", "2", "--step-seconds", "0.4")
    runs = RunStore(real_redis)

    def running() -> bool:
        run = runs.get(run_id)
        return run is not None and run.state.value == "running" and (run_dir / run_id / "pid").exists()

    wait(running, "the run to start", procs)
    parent_ts = runs.get(run_id).message_ts  # type: ignore[union-attr]
    assert parent_ts

    real_redis.flushall()  # a failover to an empty replica
    second = queue_train(real_redis, iid, BOB, "--epochs", "1")

    def refused() -> list[str]:
        mine = [m for m in slack.messages("C0TRAIN") if m.thread_ts and "U0BOB" in m.text and "is busy" in m.text]
        return [m.text for m in mine]

    wait(refused, "the second train's refusal", procs)
    assert not (run_dir / second / "pid").exists()  # never started

    def reported() -> list[str]:
        return [t for t in thread(slack, parent_ts) if "finished (exit 0)" in t]

    wait(lambda: (run_dir / run_id / "exit_code").exists(), "the run's end on the instance", procs, timeout=90)
    ended = time.time()
    wait(reported, "the end reported in its thread", procs, timeout=4 * RECONCILE_SECONDS + 10)
    took = time.time() - ended
    texts = thread(slack, parent_ts)
    assert len(reported()) == 1 and "<@U0ALICE>" in reported()[0], texts
    assert len([t for t in texts if "picked it up again" in t]) == 1, texts
    assert took <= 2 * RECONCILE_SECONDS, f"reported {took:.1f} s after the end"


def test_sigkill_of_the_worker_while_a_tick_polls_the_run_its_end_is_still_reported(
    real_redis: redis_mod.Redis, sandbox: Sandbox, slack: FakeSlack, example_repo: Path, tmp_path: Path,
    fleet_seed: SeedInfo,
) -> None:
    slack.reset()
    # The reconcile stays out of it (it runs once, at the clock's start): the lease alone heals.
    procs = Procs(sandbox, slack, example_repo, tmp_path, RUNCTL_RECONCILE_SECONDS="3600",
                  RUNCTL_MONITOR_LEASE_SECONDS="4")
    try:
        first = procs.start("worker")
        procs.start("clock")
        iid = fleet_seed.instances["gpu-box-2"]
        run_dir = sandbox.instance_dir(iid) / "runs"
        run_id = queue_train(real_redis, iid, ALICE, "--epochs", "8", "--steps-per-epoch", "2", "--step-seconds", "0.4")
        runs = RunStore(real_redis)
        wait(lambda: (run_dir / run_id / "pid").exists() and runs.get(run_id).state.value == "running",  # type: ignore[union-attr]
             "the run to start", procs)
        parent_ts = runs.get(run_id).message_ts  # type: ignore[union-attr]
        assert parent_ts

        sent = len(sandbox.sent_scripts(iid))
        sandbox.slow(iid, 6)  # the next poll's command stays InProgress for 6 s
        wait(lambda: any("::runctl::now" in s for s in sandbox.sent_scripts(iid)[sent:]), "a tick polling", procs)
        procs.kill(first)  # the worker's whole process group, mid-poll
        sandbox.slow(iid, 0)
        procs.start("worker")

        def reported() -> list[str]:
            return [t for t in thread(slack, parent_ts) if "finished (exit 0)" in t]

        wait(reported, "the end reported in its thread", procs, timeout=60)
        time.sleep(2)  # nothing reports it a second time
        assert len(reported()) == 1 and "<@U0ALICE>" in reported()[0], thread(slack, parent_ts)
        assert runs.get(run_id).state.value == "finished"  # type: ignore[union-attr]
    finally:
        procs.stop()
