"""`/runctl checkpoints` and the shared discovery, against moto + the executing-SSM
shim (every discovery script really runs under /bin/sh). The checkpoints are real:
written by the example training script into the instance's directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from workers.commands import Actor, CheckpointsCommand
from workers.jobs.checkpoints import checkpoints
from workers.remote.checkpoints import discover, discover_all
from workers.services import Services

from .conftest import sent_commands

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_with_checkpoints.py"
ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
OLD_RUN = "r20261101-090000-aaaaaa"
NEW_RUN = "r20261102-090000-bbbbbb"


def train_into(sandbox: Sandbox, iid: str, run_id: str, epochs: int = 4) -> Path:
    """Run the example script for real, writing checkpoints where a runctl run would."""
    ckdir = sandbox.instance_dir(iid) / "runs" / run_id / "checkpoints"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")}
    env["RUNCTL_CHECKPOINT_DIR"] = str(ckdir)
    subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", str(epochs), "--steps-per-epoch", "2", "--step-seconds", "0"],
        env=env,
        cwd=sandbox.instance_dir(iid),
        check=True,
        capture_output=True,
        timeout=30,
    )
    return ckdir


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def ask(svc: Services, slack: FakeSlack, iid: str, run_id: str | None = None) -> Message:
    cmd = CheckpointsCommand(instance_id=iid, run_id=run_id)
    before = len(slack.ephemerals("U0ALICE"))
    checkpoints(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"))
    replies = slack.ephemerals("U0ALICE")
    assert len(replies) == before + 1
    return replies[-1]


def texts(message: Message) -> list[str]:
    out: list[str] = []
    for block in message.blocks:
        if block.get("type") == "section":
            out.append(block["text"]["text"])
        elif block.get("type") == "context":
            out.extend(e.get("text", "") for e in block.get("elements", []))
    return out or [message.text]


def rows(message: Message) -> list[str]:
    """The listing rows, in order (each starts with its integrity mark)."""
    return [
        line
        for text in texts(message)
        for line in text.splitlines()
        if line.startswith((":white_check_mark:", ":x:", "•"))
    ]


def row(message: Message, name: str) -> str:
    lines = [line for line in rows(message) if f"`{name}`" in line]
    assert len(lines) >= 1, f"no row for {name} in {texts(message)}"
    return lines[0]


def test_listing_verifies_sha256_on_the_instance_and_flags_the_corrupt_one(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    ckdir = train_into(sandbox, iid, NEW_RUN, epochs=4)  # keeps epochs 2, 3, 4
    flip_a_byte(ckdir / "ckpt-epoch-00004.json")  # same size, different sha256

    reply = ask(svc, slack, iid)

    newest = row(reply, "ckpt-epoch-00004.json")
    assert ":x:" in newest and "CORRUPT" in newest and "sha256 does not match the manifest" in newest
    valid = row(reply, "ckpt-epoch-00003.json")
    assert ":white_check_mark:" in valid and "newest valid" in valid and "epoch 3" in valid
    assert "KB" in valid and "ago" in valid
    older = row(reply, "ckpt-epoch-00002.json")
    assert ":white_check_mark:" in older and "newest valid" not in older
    assert [line.split("`")[1] for line in rows(reply)] == [
        "ckpt-epoch-00004.json",
        "ckpt-epoch-00003.json",
        "ckpt-epoch-00002.json",
    ]
    body = "\n".join(texts(reply))
    assert f"run `{NEW_RUN}`" in body
    warning = next(t for t in texts(reply) if ":warning:" in t)
    assert "<@U0ALICE>" in warning and "Resume from `ckpt-epoch-00003.json` (epoch 3)" in warning
    assert "completed.json" not in body and "manifest.json" not in body
    # one SSM command, hashing on the instance
    assert len(sent_commands(svc, iid)) == 1
    assert "sha256sum" in sandbox.sent_scripts(iid)[-1]


def test_truncated_and_deleted_checkpoints_are_corrupt_for_the_shared_discovery(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    ckdir = train_into(sandbox, iid, NEW_RUN, epochs=4)
    full = (ckdir / "ckpt-epoch-00004.json").stat().st_size
    with open(ckdir / "ckpt-epoch-00004.json", "r+b") as fh:
        fh.truncate(full // 2)
    (ckdir / "ckpt-epoch-00002.json").unlink()

    listing = discover(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, iid, None)

    assert listing.run_id == NEW_RUN and listing.has_manifest
    assert [c.name for c in listing.checkpoints] == [
        "ckpt-epoch-00004.json",
        "ckpt-epoch-00003.json",
        "ckpt-epoch-00002.json",
    ]
    truncated, good, gone = listing.checkpoints
    assert truncated.sha256_ok is False and truncated.problem == f"size is {full // 2} bytes, the manifest says {full}"
    assert good.sha256_ok is True and good.epoch == 3 and good.size == (ckdir / good.name).stat().st_size
    assert gone.sha256_ok is False and gone.problem == "file is missing"
    assert listing.newest_valid == good
    assert listing.corrupt == [truncated, gone]
    assert listing.total_size == full // 2 + good.size
    assert len(sent_commands(svc, iid)) == 1


def test_files_without_a_manifest_are_listed_with_a_pointer_to_the_protocol(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ckdir = sandbox.instance_dir(iid) / "runs" / NEW_RUN / "checkpoints"
    (ckdir / "hf-checkpoint-500").mkdir(parents=True)
    (ckdir / "hf-checkpoint-500" / "model.safetensors").write_bytes(b"w" * 4096)
    (ckdir / "model_epoch_1.pt").write_bytes(b"x" * 2048)
    (ckdir / "model_epoch_2.pt").write_bytes(b"y" * 3072)
    (ckdir / "my best model.ckpt").write_bytes(b"z" * 10)
    (ckdir / "notes.txt").write_text("not a checkpoint")
    os.utime(ckdir / "model_epoch_1.pt", (1_700_000_000, 1_700_000_000))

    reply = ask(svc, slack, iid)

    body = "\n".join(texts(reply))
    epoch2 = row(reply, "model_epoch_2.pt")
    assert "epoch 2" in epoch2 and "3.0 KB" in epoch2
    assert all(line.startswith("•") for line in rows(reply))  # no integrity column
    assert "(directory)" in row(reply, "hf-checkpoint-500")
    assert "`my best model.ckpt`" in body
    assert "notes.txt" not in body
    names = [line.split("`")[1] for line in rows(reply)]
    assert names.index("model_epoch_2.pt") < names.index("model_epoch_1.pt")
    hint = next(t for t in texts(reply) if "manifest.json" in t)
    assert "integrity" in hint and "training/README.md" in hint


def test_newest_run_with_checkpoints_is_listed_and_an_unknown_run_gets_suggestions(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    train_into(sandbox, iid, OLD_RUN, epochs=2)
    train_into(sandbox, iid, NEW_RUN, epochs=3)
    resumed = "r20261103-090000-cccccc"  # a resumed run writes into the run it resumed
    (sandbox.instance_dir(iid) / "runs" / resumed).mkdir()
    root = svc.settings.RUNCTL_REMOTE_ROOT

    newest = discover(svc.fleet, root, iid, None)
    assert newest.run_id == NEW_RUN and newest.newest_run_id == resumed
    assert [c.epoch for c in newest.checkpoints] == [3, 2, 1]
    assert discover(svc.fleet, root, iid, OLD_RUN).run_id == OLD_RUN

    reply = ask(svc, slack, iid)
    assert any(f"The newest run, `{resumed}`, has no checkpoints of its own" in t for t in texts(reply))

    missing = ask(svc, slack, iid, "r20261102-090000-bbbbbc")
    assert "No run `r20261102-090000-bbbbbc`" in missing.text
    body = "\n".join(texts(missing))
    assert f"/runctl checkpoints {iid} --run {NEW_RUN}" in body and OLD_RUN in body

    everything = discover_all(svc.fleet, root, iid)
    assert [listing.run_id for listing in everything] == [NEW_RUN, OLD_RUN]
    assert all(c.sha256_ok for listing in everything for c in listing.checkpoints)


def test_instance_without_runs_and_run_without_checkpoints_say_what_to_do(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    empty = ask(svc, slack, iid)
    assert "No runs on" in empty.text and f"/runctl train {iid}" in empty.text

    (sandbox.instance_dir(iid) / "runs" / NEW_RUN).mkdir(parents=True)
    nothing = ask(svc, slack, iid)
    assert f"Run `{NEW_RUN}`" in nothing.text and "has no checkpoints" in nothing.text
    assert any("$RUNCTL_CHECKPOINT_DIR" in t for t in texts(nothing))


def test_stopped_and_unmanaged_instances_are_not_contacted_and_get_the_fix(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    stopped = fleet_seed.instances["old-box"]
    reply = ask(svc, slack, stopped)
    assert "stopped" in reply.text and f"Fix: /runctl start {stopped}" in reply.text
    unmanaged = fleet_seed.instances["not-managed"]
    reply = ask(svc, slack, unmanaged)
    assert f"runctl manages no instance {unmanaged}" in reply.text and "create-tags" not in reply.text
    assert sent_commands(svc, stopped) == [] and sent_commands(svc, unmanaged) == []


def test_hundreds_of_files_stay_within_slack_limits(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    ckdir = sandbox.instance_dir(iid) / "runs" / NEW_RUN / "checkpoints"
    ckdir.mkdir(parents=True)
    for step in range(250):
        (ckdir / f"step-{step:06d}-{'x' * 60}.bin").write_bytes(b"0")

    reply = ask(svc, slack, iid)

    blocks: list[dict[str, Any]] = reply.blocks
    assert 0 < len(blocks) <= 50
    assert all(len(t) <= 3000 for t in texts(reply))
    assert any("more not shown" in t for t in texts(reply))
    assert not [c for c in slack.calls_to("chat.postEphemeral") if c.error]


# The checkpoint recipe from the README, as another training script would adopt it.
RECIPE = """
import datetime, hashlib, json, os

def save_checkpoint(data: bytes, name: str, epoch: int, step: int) -> None:
    d = os.environ.get("RUNCTL_CHECKPOINT_DIR", "checkpoints")
    os.makedirs(d, exist_ok=True)

    def write(path, payload):  # temp file + fsync + rename: never half a file
        with open(path + ".tmp", "wb") as f:
            f.write(payload); f.flush(); os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    write(os.path.join(d, name), data)
    manifest = os.path.join(d, "manifest.json")
    doc = json.load(open(manifest)) if os.path.exists(manifest) else {"format_version": 1, "checkpoints": []}
    doc["checkpoints"] = [e for e in doc["checkpoints"] if e["file"] != name] + [{
        "file": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        "epoch": epoch, "step": step, "format_version": 1,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }]
    write(manifest, json.dumps(doc, indent=2).encode())
"""


def test_a_manifest_written_by_another_script_with_the_readme_recipe_is_verified(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, monkeypatch: Any
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ckdir = sandbox.instance_dir(iid) / "runs" / NEW_RUN / "checkpoints"
    monkeypatch.setenv("RUNCTL_CHECKPOINT_DIR", str(ckdir))
    recipe: dict[str, Any] = {}
    exec(RECIPE, recipe)
    for epoch in (1, 2):
        recipe["save_checkpoint"](b"weights %d" % epoch * 1000, f"model-e{epoch}.pt", epoch, epoch * 100)
    (ckdir / "model-e1.pt").write_bytes(b"oops")

    listing = discover(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, iid, NEW_RUN)

    assert listing.has_manifest
    assert [(c.name, c.epoch, c.sha256_ok) for c in listing.checkpoints] == [
        ("model-e2.pt", 2, True),
        ("model-e1.pt", 1, False),
    ]
    assert listing.newest_valid is not None and listing.newest_valid.name == "model-e2.pt"


def hashed_by_last_listing(svc: Services, iid: str) -> int:
    """How many files the newest listing on the instance really read (its `hashed` line)."""
    last = max(sent_commands(svc, iid), key=lambda c: c["RequestedDateTime"])
    out = svc.fleet.ssm.get_command_invocation(CommandId=last["CommandId"], InstanceId=iid)["StandardOutputContent"]
    return int(next(line.split()[-1] for line in out.splitlines() if line.startswith("::runctl::hashed ")))


def test_a_second_listing_reuses_the_hashes_and_a_changed_file_is_read_again(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    """Hashes are cached on the instance by (size, inode, mtime): a listing of unchanged
    multi-GB checkpoints reads nothing again, and a rewritten one is still caught."""
    iid = fleet_seed.instances["gpu-box-2"]
    ckdir = train_into(sandbox, iid, NEW_RUN, epochs=4)

    first = ask(svc, slack, iid)
    assert hashed_by_last_listing(svc, iid) == 3
    second = ask(svc, slack, iid)
    assert hashed_by_last_listing(svc, iid) == 0
    marks = [r.split(" · ")[:2] for r in rows(second)]
    assert marks == [r.split(" · ")[:2] for r in rows(first)] and all(":white_check_mark:" in m[0] for m in marks)

    flip_a_byte(ckdir / "ckpt-epoch-00004.json")
    third = ask(svc, slack, iid)
    assert hashed_by_last_listing(svc, iid) == 1
    assert "CORRUPT" in row(third, "ckpt-epoch-00004.json")
    assert ":white_check_mark:" in row(third, "ckpt-epoch-00003.json")
    assert ".runctl-sha256" not in "\n".join(texts(third))
