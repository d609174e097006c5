"""A training that a SIGTERM from outside runctl stops (someone on the instance, the
system) saves, exits 143, and the monitor reports it as stopped, not failed: against
moto + the executing-SSM shim, real Redis and the fake Slack."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs.train import train
from workers.services import Services
from workers.state.locks import train_lock
from workers.state.runs import RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


def wait_for(condition: object, what: str, timeout: float = 30) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_run_stopped_by_a_signal_on_the_instance_is_stopped_not_failed(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    signum: int,
    status: int,
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_id = f"r-signal-{status}"
    args = ("--epochs", "50", "--steps-per-epoch", "4", "--step-seconds", "0.05", "--checkpoint-interval", "100")
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    run_dir: Path = sandbox.instance_dir(iid) / "runs" / run_id
    log = run_dir / "training.log"
    wait_for(lambda: log.exists() and re.search(r"^epoch 1/50 ", log.read_text(), re.MULTILINE), "epoch 1")

    os.kill(int((run_dir / "pid").read_text()), signum)  # not through runctl
    worker.drain()

    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.STOPPED and run.exit_code == status
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-epoch-*.json"))
    assert len(saved) == 1  # interval 100: the signal saved it
    assert run.checkpoint is not None and run.checkpoint.name == saved[0]
    replies = [m.text for m in slack.thread("C0TRAIN", run.message_ts or "")]
    name = signal.Signals(signum).name
    stopped = [t for t in replies if f"was stopped by {name} from outside runctl (exit {status})" in t]
    assert stopped and saved[0] in stopped[0] and "<@U0ALICE>" in stopped[0], replies
    assert not any("failed" in t for t in replies)
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    assert "Stopped" in str(parent.blocks)
    assert train_lock(svc.redis, iid).holder() is None
