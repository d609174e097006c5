"""Never lose track of a run, with real processes: the Procfile's `worker` and `clock`
(rq), real Redis, moto + the executing-SSM shim, the fake Slack."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import redis as redis_mod
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.commands import Actor, Command, StatusCommand, TrainCommand
from workers.queueing import QUEUE, QUEUES, JobPath, RoutedQueue
from workers.queueing import enqueue_command as enqueue
from workers.services import Services
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


def queue_train(r: redis_mod.Redis, iid: str, who: Actor, *args: str, script: str = "train_with_checkpoints.py") -> str:
    run_id = f"r-proc-{uuid.uuid4().hex[:10]}"
    queue(r, TrainCommand(instance_id=iid, script=script, args=args), who, run_id)
    return run_id


def queue(r: redis_mod.Redis, cmd: Command, who: Actor, run_id: str | None = None) -> None:
    """As the front door queues a command (bot/handlers.py: the routed queue)."""
    enqueue(RoutedQueue(QUEUE, connection=r), cmd, who, run_id)


def thread(slack: FakeSlack, ts: str) -> list[str]:
    return [m.text for m in slack.thread("C0TRAIN", ts)]


def test_flushall_mid_run_a_second_train_is_refused_and_the_end_is_reported_in_the_thread(
    procs: Procs, real_redis: redis_mod.Redis, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    procs.start("worker")
    procs.start("clock")
    iid = fleet_seed.instances["gpu-box-1"]
    run_dir = sandbox.instance_dir(iid) / "runs"
    run_id = queue_train(
        real_redis, iid, ALICE, "--epochs", "30", "--steps-per-epoch", "2", "--step-seconds", "0.4"
    )  # 24 s: live through a reconcile pass even on a loaded machine
    runs = RunStore(real_redis)

    def running() -> bool:
        run = runs.get(run_id)
        return run is not None and run.state.value == "running" and (run_dir / run_id / "pid").exists()

    wait(running, "the run to start", procs)
    parent_ts = runs.get(run_id).message_ts  # type: ignore[union-attr]
    assert parent_ts

    real_redis.flushdb()  # every key runctl and RQ have (their one db): a failover to an empty replica
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
    real_redis: redis_mod.Redis,
    sandbox: Sandbox,
    slack: FakeSlack,
    example_repo: Path,
    tmp_path: Path,
    fleet_seed: SeedInfo,
) -> None:
    slack.reset()
    # The reconcile stays out of it (it runs once, at the clock's start): the lease alone heals.
    procs = Procs(
        sandbox, slack, example_repo, tmp_path, RUNCTL_RECONCILE_SECONDS="3600", RUNCTL_MONITOR_LEASE_SECONDS="4"
    )
    try:
        first = procs.start("worker")
        procs.start("clock")
        iid = fleet_seed.instances["gpu-box-2"]
        run_dir = sandbox.instance_dir(iid) / "runs"
        run_id = queue_train(real_redis, iid, ALICE, "--epochs", "8", "--steps-per-epoch", "2", "--step-seconds", "0.4")
        runs = RunStore(real_redis)
        wait(
            lambda: (run_dir / run_id / "pid").exists() and runs.get(run_id).state.value == "running",  # type: ignore[union-attr]
            "the run to start",
            procs,
        )
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


def with_env_step(example_repo: Path, dest: Path) -> Path:
    """The example code plus `envjob/`, whose requirements.txt gives its runs an environment
    step (pip, offline: already satisfied in a --system-site-packages venv)."""
    shutil.copytree(example_repo, dest)
    (dest / "envjob").mkdir()
    shutil.copy(dest / "train_with_checkpoints.py", dest / "envjob" / "train_with_checkpoints.py")
    shutil.copy(dest / "runctl_protocol.py", dest / "envjob" / "runctl_protocol.py")
    (dest / "envjob" / "requirements.txt").write_text("pip\n")
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "envjob"], check=True, capture_output=True)
    return dest


def test_a_long_environment_build_delays_neither_another_runs_updates_nor_a_status(
    real_redis: redis_mod.Redis,
    sandbox: Sandbox,
    slack: FakeSlack,
    example_repo: Path,
    tmp_path: Path,
    fleet_seed: SeedInfo,
) -> None:
    slack.reset()
    repo = with_env_step(example_repo, tmp_path / "code")
    procs = Procs(sandbox, slack, repo, tmp_path, RUNCTL_RECONCILE_SECONDS="3600")
    build_seconds = 20  # the sandbox's stand-in for a 10-minute build: the agent holds the setup command
    try:
        procs.start("worker")
        procs.start("clock")
        live_iid, build_iid = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
        runs = RunStore(real_redis)
        live = queue_train(
            real_redis, live_iid, ALICE, "--epochs", "60", "--steps-per-epoch", "2", "--step-seconds", "0.5"
        )
        wait(lambda: (sandbox.instance_dir(live_iid) / "runs" / live / "pid").exists(), "the live run", procs)
        parent_ts = runs.get(live).message_ts  # type: ignore[union-attr]

        sandbox.slow(build_iid, build_seconds, matching=".runctl-ready")  # only the environment step
        building = queue_train(real_redis, build_iid, BOB, "--epochs", "1", script="envjob/train_with_checkpoints.py")
        wait(
            lambda: runs.get(building) is not None and runs.get(building).state.value == "setting up environment",  # type: ignore[union-attr]
            "the environment build",
            procs,
            timeout=60,
        )
        began = time.monotonic()

        time.sleep(3)
        asked = time.monotonic()
        queue(real_redis, StatusCommand(instance_id=live_iid), Actor(user_id="U0CARL", channel_id="C0TRAIN"))
        wait(lambda: slack.ephemerals("U0CARL"), "the status answer", procs, timeout=30)
        answered = time.monotonic() - asked
        wait(lambda: time.monotonic() - began > build_seconds - 4, "most of the build", procs)
        still = runs.get(building)
        assert still is not None and still.state.value == "setting up environment"  # the window held
        window = (began, time.monotonic())

        updates = [
            c.at
            for c in slack.calls_to("chat.update")
            if c.params.get("ts") == parent_ts and window[0] <= c.at <= window[1]
        ]
        gaps = [b - a for a, b in zip([window[0], *updates], [*updates, window[1]], strict=True)]
        text = slack.ephemerals("U0CARL")[0].text
        assert live in text and "Live run" in text
        assert answered < 5, f"status took {answered:.1f} s"
        # The live run polls every RUNCTL_POLL_MAX_SECONDS (1 s) and updates its message each poll.
        assert len(updates) >= (window[1] - window[0]) / 3 and max(gaps) < 4, gaps
        sandbox.slow(build_iid, 0)
        wait(
            lambda: runs.get(building) is not None and runs.get(building).state.ended,  # type: ignore[union-attr]
            "the build's run",
            procs,
            timeout=90,
        )
    finally:
        sandbox.slow(fleet_seed.instances["cpu-box"], 0)
        procs.stop()


def pool_of(worker_pid: int) -> int:
    """The `worker` process (pool) a pool worker was forked from."""
    return int(Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_two_worker_processes_poll_each_of_twenty_runs_once_per_due_time(
    real_redis: redis_mod.Redis,
    sandbox: Sandbox,
    slack: FakeSlack,
    example_repo: Path,
    tmp_path: Path,
    fleet_seed: SeedInfo,
) -> None:
    slack.reset()
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    made = ec2.run_instances(
        ImageId=AMI_ID,
        InstanceType="t3.micro",
        MinCount=20,
        MaxCount=20,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": MANAGED_TAG, "Value": "true"}]}],
    )
    ids = [i["InstanceId"] for i in made["Instances"]]
    # Every run is due 1 s after its last poll; a worker process with one quick and one long horse.
    procs = Procs(
        sandbox,
        slack,
        example_repo,
        tmp_path,
        RUNCTL_RECONCILE_SECONDS="3600",
        RUNCTL_POLL_MIN_SECONDS="1",
        RUNCTL_POLL_MAX_SECONDS="1",
        RUNCTL_QUICK_WORKERS="1",
        RUNCTL_LONG_WORKERS="1",
    )
    try:
        pools = [procs.start("worker"), procs.start("worker")]
        procs.start("clock")
        run_ids = {
            iid: queue_train(
                real_redis,
                iid,
                ALICE,
                "--epochs",
                "60",
                "--steps-per-epoch",
                "1",
                "--step-seconds",
                "2",
                "--checkpoint-interval",
                "1000",
            )
            for iid in ids
        }

        def all_running() -> bool:
            return all((sandbox.instance_dir(iid) / "runs" / rid / "pid").exists() for iid, rid in run_ids.items())

        wait(all_running, "20 runs to start", procs, timeout=180)
        time.sleep(3)
        began = time.monotonic()
        time.sleep(20)
        ended = time.monotonic()

        for iid, rid in run_ids.items():
            polls = [t for t, s in sandbox.sent_log(iid) if "::runctl::alive" in s and rid in s and began <= t <= ended]
            between = [b - a for a, b in itertools.pairwise(polls)]
            edges = [b - a for a, b in itertools.pairwise([began, *polls, ended])]
            assert len(polls) >= 4, (rid, polls)
            assert min(between) > 0.8, f"{rid} polled twice for one due time: {between}"  # due 1 s after a poll
            assert max(edges) < 6, f"{rid} skipped a due time: {edges}"
        # Both worker processes took part: their ticks polled runs.
        workers = {w.name: w.pid for w in Worker.all(connection=real_redis) if w.pid is not None}
        done = FinishedJobRegistry(queue=Queue(QUEUE, connection=real_redis)).get_job_ids()
        polled_by: set[int] = set()
        for job in Job.fetch_many(done, connection=real_redis):
            result = job.latest_result() if job is not None and job.func_name == JobPath.MONITOR_TICK.value else None
            if result is None or result.worker_name not in workers:
                continue
            if str(result.return_value).startswith("polled") and result.return_value != "polled 0":
                polled_by.add(pool_of(workers[result.worker_name]))
        assert polled_by == {p.pid for p in pools}, polled_by
    finally:
        procs.stop()
        ec2.terminate_instances(InstanceIds=ids)


def test_a_train_whose_worker_died_is_told_in_its_thread_not_repeated(
    svc: Services,
    sandbox: Sandbox,
    slack: FakeSlack,
    example_repo: Path,
    tmp_path: Path,
    fleet_seed: SeedInfo,
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    procs = Procs(sandbox, slack, example_repo, tmp_path, RUNCTL_RECONCILE_SECONDS="3600")
    try:
        worker = procs.start("worker")
        sandbox.slow(iid, 30, matching="echo synced")  # the train's one command: it stays InProgress
        run_id = queue_train(svc.redis, iid, ALICE, "--epochs", "1")
        wait(lambda: any("echo synced" in s for s in sandbox.sent_scripts(iid)), "the train's command", procs)
        procs.kill(worker)  # mid-train
    finally:
        sandbox.slow(iid, 0)
        procs.stop()
    # RQ's own cleanup of abandoned jobs (what any worker's maintenance runs once the dead
    # one's heartbeats lapse), here at once: the train is told in its thread, not run again.
    for name in QUEUES:
        StartedJobRegistry(queue=Queue(name, connection=svc.redis)).cleanup(time.time() + 3600)
    run = RunStore(svc.redis).get(run_id)
    assert run is not None and run.message_ts
    told = [t for t in thread(slack, run.message_ts) if "worker stopped" in t]
    assert len(told) == 1 and "/runctl train" in told[0] and "picks it up" in told[0], thread(slack, run.message_ts)
    assert not any(
        j.func_name == JobPath.TRAIN.value for name in QUEUES for j in Queue(name, connection=svc.redis).jobs
    )
