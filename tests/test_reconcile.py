"""The reconcile heals Redis from the instances: moto + the executing-SSM shim, real
Redis, the fake Slack, the real training script. (The same with real worker and clock
processes: tests/test_heal_processes.py.)"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs.reconcile import reconcile
from workers.jobs.train import train
from workers.services import Services
from workers.state import polls, records
from workers.state.locks import Holder, train_lock
from workers.state.runs import RunMeta, RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start(iid: str, run_id: str, epochs: int, step_seconds: float = 0.1) -> None:
    args = ("--epochs", str(epochs), "--steps-per-epoch", "2", "--step-seconds", str(step_seconds))
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)


def replies(slack: FakeSlack, ts: str | None) -> list[str]:
    assert ts is not None
    return [m.text for m in slack.thread("C0TRAIN", ts)]


def epoch_seen(run_dir: Path, n: int) -> bool:
    log = run_dir / "training.log"
    return log.exists() and re.search(rf"^epoch {n}/", log.read_text(), re.MULTILINE) is not None


def test_meta_json_holds_what_rebuilds_the_record(svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    start(iid, "r-meta", epochs=1, step_seconds=0.01)
    run = svc.runs.get("r-meta")
    assert run is not None and run.message_ts
    meta = RunMeta.model_validate_json((sandbox.instance_dir(iid) / "runs" / "r-meta" / "meta.json").read_text())
    assert (meta.user, meta.channel, meta.ts, meta.script, meta.ref) == (
        "U0ALICE",
        "C0TRAIN",
        run.message_ts,
        "train_with_checkpoints.py",
        "main",
    )
    assert meta.sha == run.sha and len(meta.sha) == 40
    assert meta.started_at is not None and meta.checkpoint_dir == "runs/r-meta/checkpoints"
    # Signed by the bot for this run on this instance, with a key that never reaches it.
    key = records.record_key(svc.settings)
    text = (sandbox.instance_dir(iid) / "runs" / "r-meta" / "meta.json").read_text()
    assert records.verified_meta(key, text, "r-meta", iid).sig == meta.sig
    sent = "".join(sandbox.sent_scripts(iid))
    assert meta.sig in sent and key.hex() not in sent and svc.settings.secret("SLACK_BOT_TOKEN") not in sent


def test_flushall_mid_run_the_run_is_adopted_and_its_end_reported_once(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run_dir = sandbox.instance_dir(iid) / "runs" / "r-flush"
    start(iid, "r-flush", epochs=12, step_seconds=0.15)
    parent_ts = svc.runs.get("r-flush").message_ts  # type: ignore[union-attr]
    wait_for(lambda: epoch_seen(run_dir, 1), "epoch 1")
    training = int((run_dir / "pid").read_text())
    os.kill(training, signal.SIGSTOP)  # live, but it cannot end while the passes look (a loaded machine is slow)

    svc.redis.flushdb()  # every key runctl and RQ have (one db), as a failover to an empty replica loses them
    # Two passes at once: one adopts, neither says so twice.
    passes = [threading.Thread(target=reconcile) for _ in range(2)]
    for t in passes:
        t.start()
    for t in passes:
        t.join()
    reconcile()

    run = svc.runs.get("r-flush")
    assert run is not None and run.state is RunState.RUNNING
    assert (run.message_ts, run.user_id, run.channel_id) == (parent_ts, "U0ALICE", "C0TRAIN")
    holder = train_lock(svc.redis, iid).holder()
    assert holder is not None and holder.run_id == "r-flush"
    picked = [t for t in replies(slack, parent_ts) if "lost track of this run at" in t and "picked it up again" in t]
    assert len(picked) == 1, replies(slack, parent_ts)

    os.kill(training, signal.SIGCONT)
    worker.drain(timeout=90)
    run = svc.runs.get("r-flush")
    assert run is not None and run.state is RunState.SUCCEEDED
    done = [t for t in replies(slack, parent_ts) if "finished (exit 0)" in t]
    assert len(done) == 1 and "<@U0ALICE>" in done[0] and "ckpt-epoch-00012.json" in done[0]
    assert train_lock(svc.redis, iid).holder() is None
    reconcile()  # marks it reported on the instance
    reconcile()
    worker.drain()
    assert (run_dir / "reported").exists()
    assert len([t for t in replies(slack, parent_ts) if "finished (exit 0)" in t]) == 1


def test_an_end_redis_lost_before_it_was_reported_is_reported(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_dir = sandbox.instance_dir(iid) / "runs" / "r-ended"
    start(iid, "r-ended", epochs=2, step_seconds=0.05)
    parent_ts = svc.runs.get("r-ended").message_ts  # type: ignore[union-attr]
    svc.redis.flushdb()  # every key runctl and RQ have (one db), as a failover to an empty replica loses them
    wait_for(lambda: (run_dir / "exit_code").exists(), "the run's end on the instance")

    reconcile()
    worker.drain()
    run = svc.runs.get("r-ended")
    assert run is not None and run.state is RunState.SUCCEEDED and run.exit_code == 0
    texts = replies(slack, parent_ts)
    assert len([t for t in texts if "finished (exit 0)" in t and "ckpt-epoch-00002.json" in t]) == 1, texts
    assert not any("picked it up again" in t for t in texts)  # it had ended: nothing to pick up


def test_a_live_run_nobody_follows_whose_process_vanished_is_reported_with_its_log(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_dir = sandbox.instance_dir(iid) / "runs" / "r-gone"
    start(iid, "r-gone", epochs=50)
    wait_for(lambda: epoch_seen(run_dir, 1), "epoch 1")
    svc.redis.delete(polls.DUE, polls.TICK_AT)  # a tick died holding it
    os.killpg(int((run_dir / "pgid").read_text()), signal.SIGKILL)  # wrapper and training: no exit code
    wait_for(lambda: not _alive(int((run_dir / "pid").read_text())), "the training to die")

    reconcile()
    worker.drain()
    run = svc.runs.get("r-gone")
    assert run is not None and run.state.ended
    texts = replies(slack, run.message_ts)
    gone = [t for t in texts if "exit code unknown (the process vanished)" in t]
    assert len(gone) == 1 and "epoch 1/50" in gone[0], texts
    assert not (run_dir / "exit_code").exists()
    assert train_lock(svc.redis, iid).holder() is None


def test_a_lock_with_no_live_run_behind_it_is_released(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    stale = Holder(run_id="r-never-was", user_id="U0BOB", script="x.py", since=svc.clock()).token()
    assert train_lock(svc.redis, iid).acquire(stale)
    reconcile()
    assert train_lock(svc.redis, iid).holder() is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill -0; its state says it is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
