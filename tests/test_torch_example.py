"""training/train_torch.py, the PyTorch example, on the CPU: as a real subprocess, and as a
run of the bot (the sandbox's executing SSM, real Redis, fake Slack) that `/runctl stop` stops.

PyTorch takes seconds to load in each process, so these run only when selected:
`pip install torch==2.13.0`, then `python3 -m pytest -m torch`.
"""

from __future__ import annotations

import io
import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.aws.instance import PYTHON_TAG
from workers.commands import Actor, StopCommand, TrainCommand
from workers.jobs.stop import stop
from workers.jobs.train import train
from workers.services import Services
from workers.state.runs import RunState

from .training import (
    TRAINING,
    Run,
    assert_valid_entry,
    clean_env,
    epoch_lines,
    epochs_of,
    manifest,
    marker,
    resumed_epoch,
    run_script,
    wait_until,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

SCRIPT = TRAINING / "train_torch.py"
DEADLINE = 120.0  # importing torch alone takes seconds on a loaded machine
TORCH_KEYS = frozenset({"format_version", "epoch", "step", "hidden", "model", "optimizer"})
ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


def torch_load(data: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return payload


def env(**extra: str) -> dict[str, str]:
    return clean_env(OMP_NUM_THREADS="1", **extra)  # a tiny model: threads only add overhead


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def progress_in(path: Path, epoch: int, past_step: int) -> bool:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    return bool(record["epoch"] == epoch and record["step"] > past_step)


def test_sigterm_mid_epoch_saves_torch_checkpoint_and_resume_trains_each_epoch_once(
    tmp_path: Path, runs: list[Run]
) -> None:
    epochs, steps = 4, 20
    args = ("--epochs", str(epochs), "--steps-per-epoch", str(steps))
    reference = run_script(
        *args, "--checkpoint-dir", str(tmp_path / "ref"), cwd=tmp_path, env=env(), script=SCRIPT, timeout=DEADLINE
    )
    assert reference.returncode == 0, reference.stderr
    assert epochs_of(reference.stdout) == [1, 2, 3, 4]

    # Interval 100: only the last epoch would be saved, so the checkpoint below is SIGTERM's.
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    run = Run(
        *args,
        "--step-seconds",
        "0.05",
        "--checkpoint-interval",
        "100",
        cwd=tmp_path,
        env=env(RUNCTL_CHECKPOINT_DIR=str(ckdir), RUNCTL_PROGRESS_FILE=str(progress)),
        script=SCRIPT,
        deadline=DEADLINE,
    )
    runs.append(run)
    run.wait_for_line(rf"^epoch 2/{epochs} ")
    wait_until(lambda: progress_in(progress, 3, 2 * steps), "a progress write in the middle of epoch 3", DEADLINE)
    run.signal(signal.SIGTERM)
    assert run.finish() == 143  # 128 + SIGTERM: `train && evaluate` does not go on

    assert epochs_of(run.stdout) == [1, 2]  # the partial epoch 3 was discarded
    assert f"received SIGTERM, checkpoint saved {ckdir}/ckpt-epoch-00002.pt (epoch 2)" in run.stdout
    assert any(line.startswith("received SIGTERM, finishing the current step") for line in run.stderr)
    (entry,) = manifest(ckdir)
    saved = assert_valid_entry(ckdir, entry, ".pt", torch_load, TORCH_KEYS)
    assert (saved["epoch"], saved["step"]) == (2, 2 * steps)
    assert set(saved["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(isinstance(t, torch.Tensor) for t in saved["model"].values())
    assert saved["optimizer"]["state"][0]["step"] == 2 * steps  # AdamW's own state is in it
    assert marker(ckdir) | {"finished_at": None} == {
        "exit_status": 143,
        "epoch": 2,
        "finished_at": None,
        "reason": "signal",
        "checkpoint": "ckpt-epoch-00002.pt",
    }

    resumed = run_script(
        *args, cwd=tmp_path, env=env(RUNCTL_CHECKPOINT_DIR=str(ckdir)), script=SCRIPT, timeout=DEADLINE
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed_epoch(resumed.stdout) == ("ckpt-epoch-00002.pt", 2)
    combined = epoch_lines(run.stdout) + epoch_lines(resumed.stdout)
    assert epochs_of(combined) == [1, 2, 3, 4]
    # Model and optimizer state came back exactly: the losses match the uninterrupted run's.
    assert combined == epoch_lines(reference.stdout)
    final = torch.load(ckdir / "ckpt-epoch-00004.pt", weights_only=True)
    assert (final["epoch"], final["step"]) == (4, 4 * steps)


# ---------------------------------------------------------------------------
# through the bot


def test_stop_report_on_the_torch_example_names_its_saved_checkpoint(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    # As on a Deep Learning AMI: the agent's `python3` has no torch; the tag names the one that does.
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": PYTHON_TAG, "Value": sys.executable}])
    run_id = "r-torch-1"
    script_args = (
        "--epochs",
        "40",
        "--steps-per-epoch",
        "10",
        "--step-seconds",
        "0.05",
        "--checkpoint-interval",
        "100",
    )
    cmd = TrainCommand(instance_id=iid, script="train_torch.py", args=script_args)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    run_dir = sandbox.instance_dir(iid) / "runs" / run_id
    log = run_dir / "training.log"

    def epoch_done() -> bool:
        return log.exists() and re.search(r"^epoch 1/40 ", log.read_text(), re.MULTILINE) is not None

    wait_until(epoch_done, "epoch 1 in training.log", DEADLINE)

    stop(StopCommand(instance_id=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))

    ckdir = run_dir / "checkpoints"
    saved = sorted(p.name for p in ckdir.glob("ckpt-epoch-*.pt"))
    assert len(saved) == 1, saved  # interval 100: SIGTERM saved it
    summaries = [m for m in slack.messages("C0TRAIN") if "stopped *gpu-box-1" in m.text + json.dumps(m.blocks)]
    assert summaries, [m.text for m in slack.messages("C0TRAIN")]
    report = summaries[-1].text + json.dumps(summaries[-1].blocks)
    assert f"saved `{saved[0]}`" in report and "on SIGTERM" in report
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED
    assert run.checkpoint is not None and run.checkpoint.name == saved[0]
    assert (run_dir / "exit_code").read_text().strip() == "143"
    (entry,) = manifest(ckdir)
    payload = assert_valid_entry(ckdir, entry, ".pt", torch_load, TORCH_KEYS)
    assert payload["epoch"] == run.checkpoint.epoch
