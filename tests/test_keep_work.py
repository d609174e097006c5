"""Runs keep their work (issue 16 §1): what a run writes relative to its working directory
survives the next sync, discovery looks where scripts really save, and long listings keep
their newest entries. Against moto + the executing-SSM shim, real Redis and the fake Slack."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import CheckpointsCommand, TrainCommand
from workers.jobs.checkpoints import checkpoints
from workers.jobs.train import train
from workers.remote.checkpoints import MAX_FILES_PER_RUN, discover
from workers.services import Services
from workers.state.runs import RunState

from .test_lifecycle import ALICE, CHANNEL, posted, run_dir, stop_cmd, text_of, wait_for_epoch

BRANCH = "keeps-its-work"

# Saves the way many real scripts do: relative to the working directory, ignoring
# $RUNCTL_CHECKPOINT_DIR. VERSION changes between the two commits.
RELATIVE = """import json, os, sys, time
VERSION = {version!r}
epochs = int(sys.argv[1])
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0
os.makedirs("checkpoints", exist_ok=True)
os.makedirs("outputs", exist_ok=True)
for epoch in range(1, epochs + 1):
    time.sleep(pause)
    with open(f"checkpoints/ckpt-{{epoch:04d}}.json", "w") as f:
        json.dump({{"epoch": epoch, "version": VERSION}}, f)
    with open("outputs/metrics.jsonl", "a") as f:
        f.write(json.dumps({{"epoch": epoch, "version": VERSION}}) + "\\n")
    print(f"epoch {{epoch}}/{{epochs}} loss={{1 / epoch:.3f}}", flush=True)
"""

# Declares --checkpoint-dir; saves only where it is told.
DECLARES_DIR = """import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--checkpoint-dir", default="nowhere")
p.add_argument("--output-dir", default="")
a = p.parse_args()
os.makedirs(a.checkpoint_dir, exist_ok=True)
open(os.path.join(a.checkpoint_dir, "model-epoch-1.pt"), "w").write("weights")
if a.output_dir:
    os.makedirs(a.output_dir, exist_ok=True)
    open(os.path.join(a.output_dir, "final.safetensors"), "w").write("final")
print("epoch 1/1 done", flush=True)
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        check=True,
        capture_output=True,
    )


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    """A commit on BRANCH (main, which other tests use, is left alone)."""
    git(repo, "checkout", "-q", BRANCH) if _has_branch(repo) else git(repo, "checkout", "-q", "-b", BRANCH)
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    git(repo, "checkout", "-q", "main")


def _has_branch(repo: Path) -> bool:
    out = subprocess.run(["git", "-C", str(repo), "branch", "--list", BRANCH], capture_output=True, text=True)
    return bool(out.stdout.strip())


def train_ref(iid: str, script: str, run_id: str, *args: str) -> None:
    cmd = TrainCommand(instance_id=iid, script=script, ref=BRANCH, args=args)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)


def listed(slack: FakeSlack, iid: str, run_id: str | None) -> str:
    checkpoints(
        CheckpointsCommand(instance_id=iid, run_id=run_id).model_dump(mode="json"), ALICE.model_dump(mode="json")
    )
    return text_of(slack.ephemerals("U0ALICE")[-1])


def test_relative_writes_survive_the_next_sync_and_are_listed_and_counted(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    example_repo: Path,
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    commit(example_repo, {"relative.py": RELATIVE.format(version="v1")}, "relative saver v1")
    train_ref(iid, "relative.py", "r-keep-1", "3")
    worker.drain()
    first = svc.runs.get("r-keep-1")
    assert first is not None and first.state is RunState.SUCCEEDED, first

    commit(example_repo, {"relative.py": RELATIVE.format(version="v2")}, "relative saver v2")
    train_ref(iid, "relative.py", "r-keep-2", "50", "0.2")
    wait_for_epoch(sandbox, iid, "r-keep-2", 2)

    # The second sync shipped v2 and the second run works in its own copy of it...
    work1, work2 = run_dir(sandbox, iid, "r-keep-1") / "work", run_dir(sandbox, iid, "r-keep-2") / "work"
    assert "'v2'" in (work2 / "relative.py").read_text()
    # ...while the first run's relative writes are all still there.
    assert sorted(p.name for p in (work1 / "checkpoints").iterdir()) == [
        "ckpt-0001.json",
        "ckpt-0002.json",
        "ckpt-0003.json",
    ]
    assert json.loads((work1 / "checkpoints" / "ckpt-0003.json").read_text())["version"] == "v1"
    assert len((work1 / "outputs" / "metrics.jsonl").read_text().splitlines()) == 3

    text = listed(slack, iid, "r-keep-1")
    assert "3 checkpoints" in text
    assert all(f"./checkpoints/ckpt-000{e}.json" in text for e in (1, 2, 3))

    stop_cmd(iid)
    report = text_of(posted(slack, "stopped *gpu-box-1"))
    saved = sorted((work2 / "checkpoints").iterdir())
    assert len(saved) >= 2
    assert f"The run has {len(saved)} checkpoints" in report
    assert f"./checkpoints/{saved[-1].name}" in report, report
    # and still, after the stop, the first run's work is intact
    assert len(list((work1 / "checkpoints").iterdir())) == 3


def test_a_declared_checkpoint_dir_gets_runctls_and_output_dirs_are_searched(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    example_repo: Path,
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    commit(example_repo, {"declares.py": DECLARES_DIR}, "declares --checkpoint-dir")
    train_ref(iid, "declares.py", "r-keep-dir")
    worker.drain()
    run = svc.runs.get("r-keep-dir")
    assert run is not None and run.state is RunState.SUCCEEDED, run
    assert any("`--checkpoint-dir $RUNCTL_CHECKPOINT_DIR`" in n for n in run.notes)
    assert any("--checkpoint-dir" in m.text for m in slack.thread(CHANNEL, run.message_ts or "")) or any(
        "--checkpoint-dir" in text_of(m) for m in slack.messages(CHANNEL) if m.ts == run.message_ts
    )
    assert (run_dir(sandbox, iid, "r-keep-dir") / "checkpoints" / "model-epoch-1.pt").exists()
    assert "model-epoch-1.pt" in listed(slack, iid, "r-keep-dir")

    # Given by the user: passed as is, nothing added, and discovery looks there (and in --output-dir).
    elsewhere = sandbox.instance_dir(iid) / "elsewhere"
    train_ref(iid, "declares.py", "r-keep-dir2", "--checkpoint-dir", "ck", f"--output-dir={elsewhere}")
    worker.drain()
    run2 = svc.runs.get("r-keep-dir2")
    assert run2 is not None and run2.state is RunState.SUCCEEDED, run2
    assert not run2.pass_checkpoint_dir
    text = listed(slack, iid, "r-keep-dir2")
    assert "./ck/model-epoch-1.pt" in text and "final.safetensors" in text and "2 checkpoints" in text


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_long_listing_keeps_the_newest_checkpoints(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, with_manifest: bool
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ck = sandbox.instance_dir(iid) / "runs" / "r-keep-many" / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    entries = []
    count = 400
    for epoch in range(1, count + 1):
        name = f"checkpoint-with-a-rather-long-descriptive-name-epoch-{epoch:05d}.json"
        (ck / name).write_text("x")
        os.utime(ck / name, (1_700_000_000 + epoch, 1_700_000_000 + epoch))
        entries.append({"file": name, "size": 1, "epoch": epoch})
    if with_manifest:
        (ck / "manifest.json").write_text(json.dumps({"format_version": 1, "checkpoints": entries}, indent=2))
    listing = discover(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, iid, "r-keep-many", verify=False)
    epochs = [c.epoch for c in listing.checkpoints]
    assert epochs[0] == count and epochs == list(range(count, count - MAX_FILES_PER_RUN, -1))
    assert listing.omitted == count - MAX_FILES_PER_RUN
