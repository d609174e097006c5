"""Progress in the run's parent message: from the progress file when the script
writes one, else parsed from training.log. Against moto + the executing-SSM shim."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs.monitor import monitor
from workers.jobs.train import train
from workers.remote.status import progress_from_file
from workers.services import Services
from workers.slack.ids import BlockId
from workers.slack.messages.run import progress_text
from workers.state.runs import Progress, Run, RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
RUN_ID = "r20261128-120000-abcdef"
PROGRESS = {
    "epoch": 3,
    "total_epochs": 10,
    "step": 45,
    "total_steps": 100,
    "metrics": {"loss": 0.123456},
    "eta_seconds": 125.0,
    "updated_at": "2026-11-28T12:00:00.000Z",
}


@pytest.fixture
def training_process() -> Iterator[int]:
    """A live process standing in for the training, so the run counts as alive."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def live_run(
    svc: Services, sandbox: Sandbox, iid: str, pid: int, log: str, progress: str | None, run_id: str = RUN_ID
) -> Run:
    rdir = sandbox.instance_dir(iid) / "runs" / run_id
    rdir.mkdir(parents=True)
    (rdir / "pid").write_text(f"{pid}\n")
    (rdir / "training.log").write_text(log)
    if progress is not None:
        (rdir / "progress.json").write_text(progress)
    run = Run(
        run_id=run_id,
        instance_id=iid,
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train_with_checkpoints.py",
        state=RunState.RUNNING,
        started_at=svc.clock(),
    )
    svc.runs.create(run)
    return svc.runs.save(run)


def progress_block(slack: FakeSlack, ts: str | None) -> str:
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == ts)
    block: dict[str, Any] = next(b for b in parent.blocks if b.get("block_id") == BlockId.RUN_PROGRESS)
    return str(block["text"]["text"])


def test_parent_message_shows_bar_epoch_metric_and_eta_from_the_progress_file(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, training_process: int
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    log = "epoch 9/10 loss=9.0\n"  # the file wins over the log
    live_run(svc, sandbox, iid, training_process, log, json.dumps(PROGRESS))

    assert monitor(RUN_ID) == "polled 1"

    run = svc.runs.get(RUN_ID)
    assert run is not None and run.state is RunState.RUNNING
    assert run is not None and run.progress is not None and run.progress.source == "file"
    text = progress_block(slack, run.message_ts)
    assert "`█████████░░░░░░░░░░░ 45%`" in text  # step 45 of 100
    assert "epoch 3/10" in text
    assert "loss 0.1235" in text
    assert "ETA 2m 05s" in text
    assert "training.log" not in text


def test_without_a_usable_progress_file_the_log_is_parsed(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, training_process: int
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    log = "loading data\nepoch 1/3 loss=1.000\nepoch 2/3 loss=0.500\nsaving\n"
    for n, progress in enumerate([None, "{not json", '{"epoch": "three"}']):
        run_id = f"{RUN_ID}-{n}"
        live_run(svc, sandbox, iid, training_process, log, progress, run_id)

        assert monitor(run_id).startswith("polled")

        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.RUNNING
        text = progress_block(slack, run.message_ts)
        assert "67%" in text and "epoch 2/3" in text and "loss 0.5" in text, progress
        assert "_(from training.log)_" in text, progress


def test_script_without_progress_file_is_followed_through_its_log(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    cmd = TrainCommand(instance_id=iid, script="no_checkpoints.py")
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), RUN_ID)
    worker.drain()

    run = svc.runs.get(RUN_ID)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    text = progress_block(slack, run.message_ts)
    assert "100%" in text and "epoch 3/3" in text and "loss 0.333" in text and "from training.log" in text


def test_example_script_is_followed_through_its_progress_file(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--step-seconds", "0.05")
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), RUN_ID)
    worker.drain()

    run = svc.runs.get(RUN_ID)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    assert run.progress is not None and run.progress.source == "file"
    text = progress_block(slack, run.message_ts)
    assert "100%" in text and "epoch 2/2" in text and "loss " in text
    assert "training.log" not in text
    assert "Checkpoint: `ckpt-epoch-00002.json`" in text and " ago" not in text  # final: absolute times


def test_step_only_progress_still_gets_a_bar() -> None:
    text = progress_text(Progress(step=250, total_steps=1000, metrics={"loss": 2.5}))
    assert text.startswith("`█████░░░░░░░░░░░░░░░ 25%`  step 250/1000")
    assert "loss 2.5" in text and "ETA" not in text


# The five-line progress recipe from the README.
RECIPE = """
import datetime, json, os
def report_progress(**fields):  # epoch, total_epochs, step, total_steps, metrics, eta_seconds
    if path := os.environ.get("RUNCTL_PROGRESS_FILE"):
        with open(path + ".tmp", "w") as f: json.dump({**fields, "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
        os.replace(path + ".tmp", path)  # atomic: the bot never reads half a file
"""


def test_the_readme_progress_recipe_is_understood(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "progress.json"
    monkeypatch.setenv("RUNCTL_PROGRESS_FILE", str(path))
    recipe: dict[str, Any] = {}
    exec(RECIPE, recipe)
    recipe["report_progress"](
        epoch=3, total_epochs=10, step=450, total_steps=1000, metrics={"loss": 0.42}, eta_seconds=610
    )
    progress = progress_from_file(path.read_text())
    assert progress is not None and progress.updated_at is not None
    assert progress_text(progress) == "`█████████░░░░░░░░░░░ 45%`  epoch 3/10  ·  loss 0.42  ·  ETA 10m 10s"
