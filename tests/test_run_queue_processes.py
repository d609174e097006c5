"""The queue with real processes (issue 27): two Procfile `worker` pools and the `clock` against
one Redis, the sandbox and the fake Slack; one worker pool is SIGKILLed while the queue runs."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_mod

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.commands import Actor, TrainCommand
from workers.queueing import QUEUE, CommandArgs, JobPath, RoutedQueue, enqueue
from workers.queueing import enqueue_command as enqueue_train
from workers.state.run_queue import QueueStore
from workers.state.runs import RunState, RunStore

from .procs import Procs

pytestmark = pytest.mark.slow

ALICE, BOB, CAROL = (Actor(user_id=u, channel_id="C0TRAIN") for u in ("U0ALICE", "U0BOB", "U0CAROL"))
SCRIPT = "train_with_checkpoints.py"


@pytest.fixture
def procs(
    real_redis: redis_mod.Redis, sandbox: Sandbox, slack: FakeSlack, example_repo: Path, tmp_path: Path
) -> Iterator[Procs]:
    slack.reset()
    # One quick and one long work horse per pool: two pools race for every job on 2 cores.
    running = Procs(
        sandbox,
        slack,
        example_repo,
        tmp_path,
        RUNCTL_QUICK_WORKERS="1",
        RUNCTL_LONG_WORKERS="1",
        RUNCTL_RECONCILE_SECONDS="5",
    )
    yield running
    running.stop()


def wait(condition: Callable[[], object], what: str, procs: Procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{procs.output()}")
        time.sleep(0.1)


def test_two_worker_pools_one_sigkilled_start_the_queue_in_order_once_each(
    procs: Procs, real_redis: redis_mod.Redis, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    first_pool = procs.start("worker")
    procs.start("worker")
    procs.start("clock")
    iid = fleet_seed.instances["gpu-box-1"]
    routed = RoutedQueue(QUEUE, connection=real_redis)
    first = f"r-qp-{uuid.uuid4().hex[:8]}"
    args = ("--epochs", "12", "--steps-per-epoch", "2", "--step-seconds", "0.25")  # 6 s
    # The live run lasts long enough (24 s) for both queue jobs to land behind it on 2 loaded cores.
    longer = ("--epochs", "12", "--steps-per-epoch", "2", "--step-seconds", "1")
    enqueue_train(routed, TrainCommand(instance_id=iid, script=SCRIPT, args=longer), ALICE, first)
    runs = RunStore(real_redis)
    wait(lambda: (r := runs.get(first)) is not None and r.state is RunState.RUNNING, "the live run", procs)
    queued = [f"q-qp-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    store = QueueStore(real_redis)
    # One after the other: two pools race for the two queue jobs, and the queue's order is the
    # order their checks finish in.
    for n, (entry_id, who) in enumerate(zip(queued, (BOB, CAROL), strict=True), 1):
        cmd = TrainCommand(instance_id=iid, script=SCRIPT, args=args, queue=True)
        enqueue(routed, JobPath.QUEUE_ADD, CommandArgs(command=cmd, run_id=entry_id), who)
        head = queued[:n]
        wait(lambda: store.ids(iid) == head, f"{n} queued", procs)  # noqa: B023 (called at once)

    wait(
        lambda: (r := runs.get(queued[0])) is not None and r.state is RunState.RUNNING,
        "the first queued run to start",
        procs,
    )
    procs.kill(first_pool)  # SIGKILL mid-queue: its work horses and whatever they were doing
    order = [first, *queued]
    wait(lambda: all((r := runs.get(i)) is not None and r.state.ended for i in order), "every run to end", procs, 240)
    ended = [runs.get(i) for i in order]
    assert [r.state for r in ended if r] == [RunState.SUCCEEDED] * 3, procs.output()
    for before, after in itertools.pairwise(ended):
        assert before and after and before.ended_at and after.started_at and after.started_at >= before.ended_at
    parents = [m for m in slack.messages("C0TRAIN") if m.thread_ts is None]
    for run_id in queued:
        assert sum(1 for m in parents if f"({run_id})" in m.text) == 1, [m.text for m in parents]
    assert store.ids(iid) == [] and store.starting(iid) is None
