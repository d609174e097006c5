"""Issue 23 A: a poisoned backup must not give root on another user's instance. Replayed
through signed slash commands (app.dispatch), the inline RQ worker, the sandbox's executing
SSM (scripts run under sh on instances that are local directories), moto S3 and the fake Slack.

Mallory is root on his own `cpu-box`: he plants a run directory named after Alice's run there
(a `checkpoint_dirs` listing `.` and an absolute path, a `work/argparse.py`), then asks for
backups of it; and a backup poisoned in S3 directly (as an older runctl wrote one) meets
Alice's resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.aws import backups
from workers.services import Services
from workers.state.runs import RunState

from .conftest import TOKEN
from .slack import command
from .test_backup import objects
from .test_lifecycle import SCRIPT, epochs_in_log, run_dir, text_of, wait_for_epoch

ALICE, MALLORY = "U0ALICE", "U0MALLORY"
QUICK = "--epochs 2 --steps-per-epoch 1 --step-seconds 0"


@pytest.fixture
def app(svc: Services, slack: FakeSlack) -> App:
    return build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)


def slash(app: App, slack: FakeSlack, worker: InlineWorker, text: str, user: str, drain: bool = True) -> str:
    """A signed `/runctl <text>`; then its job runs (with `drain`, and everything it scheduled).
    Returns what the requester was told privately since."""
    before = (worker.pending(), len(slack.ephemerals(user)))
    resp = app.dispatch(command(text, user=user))
    assert resp.status == 200
    deadline = time.monotonic() + 5
    while (worker.pending(), len(slack.ephemerals(user))) == before and time.monotonic() < deadline:
        time.sleep(0.02)  # Bolt runs the listener after the ack
    if drain:
        worker.drain(timeout=120)
    else:
        worker.work()
    said = [json.loads(resp.body)["text"]] if resp.body else []
    return "\n".join(said + [text_of(m) for m in slack.ephemerals(user)[before[1] :]])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def evil_argparse(marker: Path) -> bytes:
    """What Python imports for `import argparse` when it lies beside the script."""
    return f"open({str(marker)!r}, 'w').write('ran as ' + str(__import__('os').getuid()))\n".encode()


def alice_trains_and_backs_up(svc: Services, app: App, slack: FakeSlack, worker: InlineWorker, iid: str) -> str:
    slash(app, slack, worker, f"train {iid} {SCRIPT} -- {QUICK}", ALICE)
    run_id = svc.runs.history(iid)[0].run_id
    said = slash(app, slack, worker, f"backup {iid} --run {run_id}", ALICE)
    assert "uploaded" in said and "not backed up" not in said, said
    return run_id


def test_mallorys_backup_of_alices_run_is_refused_s3_unchanged_and_alices_resume_continues(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,
    tmp_path: Path,
) -> None:
    alice_box, other_box, mallory_box = (fleet_seed.instances[n] for n in ("gpu-box-1", "gpu-box-2", "cpu-box"))
    # Alice's run is interrupted mid-way (its process is killed: it saves on SIGTERM), then backed up.
    slash(
        app,
        slack,
        worker,
        f"train {alice_box} {SCRIPT} -- --epochs 8 --steps-per-epoch 2 --step-seconds 0.2",
        ALICE,
        drain=False,
    )
    run_id = svc.runs.history(alice_box)[0].run_id
    wait_for_epoch(sandbox, alice_box, run_id, 2)
    os.kill(int((run_dir(sandbox, alice_box, run_id) / "pid").read_text()), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not (run_dir(sandbox, alice_box, run_id) / "exit_code").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.drain(timeout=60)
    done = epochs_in_log(sandbox, alice_box, run_id)
    assert done and done[-1] < 8
    said = slash(app, slack, worker, f"backup {alice_box} --run {run_id}", ALICE)
    assert "uploaded" in said and "not backed up" not in said, said
    in_s3 = objects(svc, run_id)

    # Mallory, root on his own box, makes a run directory named after Alice's run.
    planted = run_dir(sandbox, mallory_box, run_id)
    marker, elsewhere = tmp_path / "argparse-ran", tmp_path / "etc-cron.d"
    elsewhere.mkdir()
    (elsewhere / "pwn").write_text("* * * * * root sh -c 'id > /tmp/pwned'\n")
    (planted / "work").mkdir(parents=True)
    (planted / "work" / "argparse.py").write_bytes(evil_argparse(marker))
    (planted / "checkpoints").mkdir()
    (planted / "checkpoints" / "ckpt-epoch-00099.json").write_text("{}")
    (planted / "checkpoint_dirs").write_text(f".\n{elsewhere}\n")

    from_his_box = slash(app, slack, worker, f"backup {mallory_box} --run {run_id}", MALLORY)
    assert f"Run `{run_id}` did not run on" in from_his_box and f"it ran on `{alice_box}`" in from_his_box, from_his_box
    assert f"/runctl backup {alice_box} --run {run_id}" in from_his_box
    assert objects(svc, run_id) == in_s3  # nothing uploaded, the manifest untouched
    every_run = slash(app, slack, worker, f"backup {mallory_box}", MALLORY)
    assert f"run `{run_id}` was not backed up" in every_run and "did not run on" in every_run, every_run
    assert objects(svc, run_id) == in_s3
    from_her_box = slash(app, slack, worker, f"backup {alice_box} --run {run_id}", MALLORY)
    assert f"You can't back up run `{run_id}`" in from_her_box and f"<@{ALICE}>'s" in from_her_box, from_her_box
    assert objects(svc, run_id) == in_s3
    manifest = backups.load(svc.fleet, run_id)
    assert manifest is not None and {(f.run_id, f.instance_id) for f in manifest.files} == {(run_id, alice_box)}

    # Alice's resume elsewhere restores her own checkpoints and continues at the next epoch.
    slash(app, slack, worker, f"resume {run_id} --on {other_box}", ALICE)
    second = next(r for r in svc.runs.history(other_box) if r.checkpoint_run_id == run_id)
    assert second.state is RunState.SUCCEEDED, second.error
    assert any(":inbox_tray: Restored" in n and "sha256 verified" in n for n in second.notes), second.notes
    assert done + epochs_in_log(sandbox, other_box, second.run_id) == list(range(1, 9))
    assert not (run_dir(sandbox, other_box, run_id) / "work" / "argparse.py").exists()
    assert not marker.exists()


def poison(
    svc: Services,
    run_id: str,
    manifest: dict[str, Any],
    files: dict[str, tuple[str, bytes]],
    bound_to: tuple[str, str] | None,
) -> None:
    """Objects and a manifest put in S3 directly: `files` by name (S3 suffix, bytes), added to
    the manifest's own; each bound to (run, instance) when given, else manifest-level only."""
    s3, bucket = svc.fleet.s3, svc.settings.RUNCTL_S3_BUCKET
    for name, (suffix, data) in files.items():
        key = backups.object_key(run_id, suffix)
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        entry: dict[str, Any] = {
            "name": name,
            "key": key,
            "size": len(data),
            "mtime": 1,
            "sha256": sha(data),
            "backed_up_at": datetime.now(UTC).isoformat(),
        }
        if bound_to:
            entry["run_id"], entry["instance_id"] = bound_to
        manifest["files"].append(entry)
    s3.put_object(Bucket=bucket, Key=backups.manifest_key(run_id), Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("how", ["an older runctl, from cpu-box", "bound to the run, named outside"])
def test_a_backup_poisoned_in_s3_is_refused_at_restore_and_nothing_is_written_outside_the_checkpoint_dir(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,
    tmp_path: Path,
    how: str,
    example_repo: Path,
) -> None:
    alice_box, other_box, mallory_box = (fleet_seed.instances[n] for n in ("gpu-box-1", "gpu-box-2", "cpu-box"))
    run_id = alice_trains_and_backs_up(svc, app, slack, worker, alice_box)
    marker, outside = tmp_path / "argparse-ran", tmp_path / "etc-cron.d" / "pwn"
    evil = {
        "./argparse.py": ("work/argparse.py", evil_argparse(marker)),
        "./train_with_checkpoints.py": ("work/train_with_checkpoints.py", evil_argparse(marker)),
        str(outside): ("abs" + str(outside), b"* * * * * root id\n"),
        "../escape.json": ("ckpt/../escape.json", b"{}"),
    }
    manifest = json.loads(svc.fleet.read_object(backups.manifest_key(run_id)) or b"{}")
    if how.startswith("an older"):
        # As the old backup job left it after Mallory's upload: every file bound only by the top level.
        manifest = {
            "format_version": 1,
            "run_id": run_id,
            "instance_id": mallory_box,
            "files": [{k: v for k, v in f.items() if k not in ("run_id", "instance_id")} for f in manifest["files"]],
        }
        poison(svc, run_id, manifest, evil, None)
    else:
        poison(svc, run_id, manifest, evil, (run_id, alice_box))

    said = slash(app, slack, worker, f"resume {run_id} --on {other_box}", ALICE)

    target = run_dir(sandbox, other_box, run_id)
    assert not marker.exists() and not outside.exists()
    assert not (target / "work" / "argparse.py").exists() and not (target / "escape.json").exists()
    shipped = (example_repo / SCRIPT).read_bytes()
    work_script = target / "work" / SCRIPT
    assert not work_script.exists() or work_script.read_bytes() == shipped
    resumed = [r for r in svc.runs.history(other_box) if r.checkpoint_run_id == run_id]
    if how.startswith("an older"):
        # Nothing in S3 is bound to the run's own instance: nothing to continue from there.
        assert "has no checkpoints in S3" in said and "did not come from its own instance" in said, said
        assert not resumed
        # On its own instance it continues from the disk, and says what of S3 it refused.
        slash(app, slack, worker, f"resume {run_id}", ALICE)
        again = next(r for r in svc.runs.history(alice_box) if r.checkpoint_run_id == run_id)
        assert again.state is RunState.SUCCEEDED, again.error
        refused = next(n for n in again.notes if n.startswith(":no_entry: Not restored from S3"))
        assert f"not from {alice_box}" in refused and "`./argparse.py`" in refused, refused
        assert not (run_dir(sandbox, alice_box, run_id) / "work" / "argparse.py").exists() and not marker.exists()
    else:
        assert resumed and resumed[0].state is RunState.SUCCEEDED, resumed[0].error if resumed else said
        notes = " ".join(resumed[0].notes)
        assert ":inbox_tray: Restored" in notes and "4 backed-up files saved outside the checkpoint directory" in notes
        assert "resuming from" in (run_dir(sandbox, other_box, resumed[0].run_id) / "training.log").read_text()


def test_restore_follows_no_link_out_of_the_checkpoint_dir(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,
    tmp_path: Path,
) -> None:
    alice_box, other_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["gpu-box-2"]
    run_id = alice_trains_and_backs_up(svc, app, slack, worker, alice_box)
    # Someone else who trains on the target (root there) has linked the run's checkpoint dir out.
    elsewhere = tmp_path / "root-ssh"
    elsewhere.mkdir()
    run_dir(sandbox, other_box, run_id).mkdir(parents=True)
    (run_dir(sandbox, other_box, run_id) / "checkpoints").symlink_to(elsewhere)

    slash(app, slack, worker, f"resume {run_id} --on {other_box}", ALICE)

    assert list(elsewhere.iterdir()) == []
    told = [m.text for m in slack.messages("C0TRAIN") if "could not restore" in m.text]
    assert len(told) == 1 and "not a directory of its own" in told[0] and "training was not started" in told[0], told
    # The run never started, so it neither owns the instance nor counts as its last run.
    assert not [r for r in svc.runs.history(other_box) if r.checkpoint_run_id == run_id]


def test_the_places_backed_up_come_from_the_run_record_not_the_instances_checkpoint_dirs(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,
    tmp_path: Path,
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(app, slack, worker, f"train {iid} {SCRIPT} -- {QUICK}", ALICE)
    run_id = svc.runs.history(iid)[0].run_id
    # Another trainer on the same instance (root there) adds places to the run's list.
    secrets_dir = tmp_path / "root-ssh"
    secrets_dir.mkdir()
    (secrets_dir / "id_ed25519.pt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (run_dir(sandbox, iid, run_id) / "checkpoint_dirs").write_text(f".\n{secrets_dir}\n")

    said = slash(app, slack, worker, f"backup {iid} --run {run_id}", ALICE)

    assert "uploaded" in said, said
    keys = [k.removeprefix(f"{backups.PREFIX}{run_id}/") for k in objects(svc, run_id)]
    assert keys and all(k.startswith("ckpt/") or k == "runctl-manifest.json" for k in keys), keys
