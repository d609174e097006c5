"""Checkpoints backed up to S3 and resumed anywhere (issue 16 §3), against moto S3 (the
instance really PUTs with curl through presigned URLs), the executing-SSM shim, real Redis
and the fake Slack. Every click is a signed block_actions payload."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.aws import backups
from workers.commands import Actor, BackupCommand, CheckpointsCommand, ResumeCommand, TrainCommand
from workers.jobs.backup import backup, upload_seconds, url_seconds
from workers.jobs.checkpoints import checkpoints
from workers.jobs.resume import resume
from workers.jobs.train import train
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.runs import Run, RunState

from .slack import click
from .test_lifecycle import (
    ALICE,
    CHANNEL,
    SLOW,
    as_dict,
    dispatch,
    epochs_in_log,
    run_dir,
    text_of,
    train_on,
    wait_for_epoch,
)
from .test_terminate import alice_may_terminate, ask, buttons, confirmation  # noqa: F401  (the fixture)

QUICK = ("--epochs", "2", "--steps-per-epoch", "1", "--step-seconds", "0")
URL = re.compile(r"https?://[^\s'\"]+X-Amz-Signature=[0-9a-f]+")


def objects(svc: Services, run_id: str) -> dict[str, bytes]:
    s3, bucket = svc.fleet.s3, svc.settings.RUNCTL_S3_BUCKET
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{backups.PREFIX}{run_id}/").get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def everything_slack_saw(slack: FakeSlack) -> str:
    seen: list[Any] = []
    for m in slack.messages(CHANNEL):
        seen.append(text_of(m))
        seen += [text_of(r) for r in slack.thread(CHANNEL, m.ts)]
    seen += [text_of(e) for e in slack.ephemerals("U0ALICE")]
    return json.dumps(seen)


def presigned_urls(sandbox: Sandbox, iid: str) -> list[str]:
    return [u for script in sandbox.sent_scripts(iid) for u in URL.findall(script) if "/checkpoints/" in u]


def assert_urls_stay_secret(urls: list[str], slack: FakeSlack, caplog: pytest.LogCaptureFixture) -> None:
    assert urls
    said = everything_slack_saw(slack) + caplog.text
    for url in urls:
        signature = parse_qs(urlparse(url).query)["X-Amz-Signature"][0]
        assert signature not in said
    assert "X-Amz-Signature" not in said and "X-Amz-Credential" not in said


@pytest.fixture(autouse=True)
def logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="workers")
    caplog.set_level(logging.DEBUG, logger="bot")


def test_terminate_backs_up_the_checkpoints_first_then_terminates(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = train_on(iid, *QUICK, run_id="r-backup-1")
    worker.drain()
    ck = run_dir(sandbox, iid, run_id) / "checkpoints"
    local = {p.name: sha(p.read_bytes()) for p in ck.iterdir() if not p.name.startswith(".")}
    assert {"ckpt-epoch-00001.json", "ckpt-epoch-00002.json", "manifest.json"} <= set(local)

    ask(iid)
    m = confirmation(slack)
    text = text_of(m)
    assert "backs up 2 checkpoints (" in text and "to S3 first" in text and "would be lost" in text
    found = {b["action_id"]: b for b in buttons(m)}
    assert set(found) == {
        ActionId.TERMINATE_CONFIRM,
        ActionId.TERMINATE_NO_BACKUP,
        ActionId.TERMINATE_STOP_INSTEAD,
        ActionId.TERMINATE_CANCEL,
    }
    assert found[ActionId.TERMINATE_NO_BACKUP]["text"]["text"] == "Terminate without backup"
    assert found[ActionId.TERMINATE_NO_BACKUP]["style"] == "danger" and "confirm" in found[ActionId.TERMINATE_NO_BACKUP]

    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ALICE"))

    assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
    stored = objects(svc, run_id)
    for name, digest in local.items():
        assert sha(stored[f"{backups.PREFIX}{run_id}/ckpt/{name}"]) == digest, name
    manifest = backups.load(svc.fleet, run_id)
    assert manifest is not None and {f.name: f.sha256 for f in manifest.files} == local
    final = text_of(confirmation(slack, m.ts))
    assert "terminated by <@U0ALICE>" in final and f"uploaded {len(local)} files" in final

    urls = presigned_urls(sandbox, iid)
    assert len(urls) == len(local) and all(
        parse_qs(urlparse(u).query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] for u in urls
    )
    # They expire a minute after the upload command's delivery and execution timeouts, a few minutes here.
    expires = {int(parse_qs(urlparse(u).query)["X-Amz-Expires"][0]) for u in urls}
    assert expires == {url_seconds(upload_seconds(sum(len(v) for v in stored.values())))} == {2 * 300 + 60}
    assert_urls_stay_secret(urls, slack, caplog)


def test_a_run_with_more_files_than_one_pass_holds_is_backed_up_in_passes(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.remote import backup as script

    monkeypatch.setattr(script, "MAX_FILES", 5)
    iid = fleet_seed.instances["cpu-box"]
    svc.runs.create(
        Run(
            run_id="r-backup-many",
            instance_id=iid,
            user_id="U0ALICE",
            channel_id=CHANNEL,
            script="train.py",
            state=RunState.SUCCEEDED,
        )
    )
    ck = sandbox.instance_dir(iid) / "runs" / "r-backup-many" / "checkpoints"
    ck.mkdir(parents=True)
    for i in range(12):
        (ck / f"ckpt-{i:03d}.pt").write_bytes(b"w" * (i + 1))
    backup(
        BackupCommand(instance_id=iid, run_id="r-backup-many").model_dump(mode="json"), ALICE.model_dump(mode="json")
    )
    said = text_of(slack.ephemerals("U0ALICE")[-1])
    assert "uploaded 12 files" in said and "already there" not in said, said
    assert len(objects(svc, "r-backup-many")) == 12 + 1  # and the manifest
    backup(
        BackupCommand(instance_id=iid, run_id="r-backup-many").model_dump(mode="json"), ALICE.model_dump(mode="json")
    )
    assert (
        "uploaded 0 files (0 B)" in (again := text_of(slack.ephemerals("U0ALICE")[-1])) and "12 already there" in again
    ), again


def test_terminate_without_backup_uploads_nothing(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_id = train_on(iid, *QUICK, run_id="r-backup-none")
    worker.drain()
    ask(iid)
    m = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_NO_BACKUP, "U0ALICE"))
    assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
    assert objects(svc, run_id) == {}
    assert presigned_urls(sandbox, iid) == []
    assert "terminated by <@U0ALICE>" in text_of(confirmation(slack, m.ts))


def test_backup_is_incremental_refuses_what_s3_cannot_take_and_terminate_counts_only_what_is_lost(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = train_on(iid, *QUICK, run_id="r-backup-inc")
    worker.drain()

    def run_backup() -> str:
        backup(BackupCommand(instance_id=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))
        return text_of(slack.ephemerals("U0ALICE")[-1])

    listing = CheckpointsCommand(instance_id=iid, run_id=run_id).model_dump(mode="json")
    checkpoints(listing, ALICE.model_dump(mode="json"))
    assert text_of(slack.ephemerals("U0ALICE")[-1]).count("instance only") == 2
    first = run_backup()
    assert "uploaded 4 files" in first and f"runctl/checkpoints/{run_id}/" in first
    checkpoints(listing, ALICE.model_dump(mode="json"))
    shown = text_of(slack.ephemerals("U0ALICE")[-1])
    assert shown.count("instance + S3") == 2 and "instance only" not in shown
    before = len(sandbox.s3.puts)
    second = run_backup()
    assert "uploaded 0 files" in second and "4 already there with the same sha256" in second
    assert len(sandbox.s3.puts) == before  # never twice

    # Everything is in S3: terminate would lose nothing and offers no [Terminate without backup].
    ask(iid)
    m = confirmation(slack)
    assert "are in S3 already: terminating loses none" in text_of(m)
    assert ActionId.TERMINATE_NO_BACKUP not in {b["action_id"] for b in buttons(m)}

    # A new checkpoint and one S3 cannot take in one PUT (a sparse 6 GiB file).
    ck = run_dir(sandbox, iid, run_id) / "checkpoints"
    (ck / "extra-epoch-00003.pt").write_bytes(b"weights" * 10)
    with open(ck / "huge-epoch-00004.pt", "wb") as f:
        f.truncate(6 * 1024**3)
    ask(iid)
    text = text_of(confirmation(slack))
    assert "*2 checkpoints (6.0 GB)* in run" in text and "backs up 1 checkpoint (70 B) to S3 first" in text, text
    assert "The other 2 are in S3 already" in text and "`huge-epoch-00004.pt`) cannot be backed up" in text, text

    third = run_backup()
    assert "uploaded 1 file (70 B)" in third and "4 already there" in third, third
    assert "`huge-epoch-00004.pt` not backed up" in third and "5 GB limit" in third, third
    assert sha(objects(svc, run_id)[f"{backups.PREFIX}{run_id}/ckpt/extra-epoch-00003.pt"]) == sha(b"weights" * 10)
    os.remove(ck / "huge-epoch-00004.pt")
    assert_urls_stay_secret(presigned_urls(sandbox, iid), slack, caplog)


def test_resume_on_another_instance_restores_from_s3_and_continues_at_the_next_epoch(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old_box, new_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["gpu-box-2"]
    epochs = ("--epochs", "12", *SLOW[2:])
    first = train_on(old_box, *epochs, run_id="r-resume-1")
    wait_for_epoch(sandbox, old_box, first, 3)
    ask(old_box)
    dispatch(svc, slack, worker, click(as_dict(confirmation(slack)), ActionId.TERMINATE_CONFIRM, "U0ALICE"))
    assert svc.fleet.get(old_box).state in ("shutting-down", "terminated")
    done = epochs_in_log(sandbox, old_box, first)
    assert done and objects(svc, first)

    resume(ResumeCommand(run_id=first, instance_id=new_box).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    worker.drain(timeout=120)

    second = next(r for r in svc.runs.history(new_box) if r.checkpoint_run_id == first)
    assert second.state is RunState.SUCCEEDED, second.error
    assert second.args == svc.runs.get(first).args  # type: ignore[union-attr]
    assert any(":inbox_tray: Restored" in n and "sha256 verified" in n for n in second.notes)
    restored = run_dir(sandbox, new_box, first) / "checkpoints"
    assert (restored / "manifest.json").exists()
    log = (run_dir(sandbox, new_box, second.run_id) / "training.log").read_text()
    assert "resuming from" in log and f"(epoch {done[-1]})" in log
    assert done + epochs_in_log(sandbox, new_box, second.run_id) == list(range(1, 13))
    assert_urls_stay_secret(presigned_urls(sandbox, new_box) + presigned_urls(sandbox, old_box), slack, caplog)


def test_train_backup_uploads_each_new_checkpoint_once(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    cmd = TrainCommand(
        instance_id=iid,
        script="train_with_checkpoints.py",
        backup=True,
        args=("--epochs", "4", "--steps-per-epoch", "2", "--step-seconds", "0.3"),
    )
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-backup-live")
    worker.drain(timeout=120)
    run = svc.runs.get("r-backup-live")
    assert run is not None and run.state is RunState.SUCCEEDED and run.backup
    assert any("`--backup`" in n for n in run.notes)
    ck = run_dir(sandbox, iid, run.run_id) / "checkpoints"
    stored = objects(svc, run.run_id)
    for p in ck.glob("ckpt-epoch-*.json"):
        assert sha(stored[f"{backups.PREFIX}{run.run_id}/ckpt/{p.name}"]) == sha(p.read_bytes()), p.name
    keys = [urlparse(u).path for u in presigned_urls(sandbox, iid)]
    checkpoint_keys = [k for k in keys if "/ckpt-epoch-" in k]
    assert checkpoint_keys and len(checkpoint_keys) == len(set(checkpoint_keys))  # none went up twice
    assert_urls_stay_secret(presigned_urls(sandbox, iid), slack, caplog)


def test_resume_refuses_another_instance_without_a_backup(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = train_on(iid, *QUICK, run_id="r-resume-nobackup")
    worker.drain()
    other = fleet_seed.instances["gpu-box-2"]
    resume(
        ResumeCommand(run_id=run_id, instance_id=other).model_dump(mode="json"),
        Actor(user_id="U0ALICE", channel_id=CHANNEL).model_dump(mode="json"),
    )
    said = text_of(slack.ephemerals("U0ALICE")[-1])
    assert "has no checkpoints in S3" in said and f"/runctl backup {iid} --run {run_id}" in said
    assert not [r for r in svc.runs.history(other) if r.checkpoint_run_id == run_id]


def test_restore_script_is_posix_sh_and_quotes_names() -> None:
    import subprocess

    from workers.remote.backup import Download, instance_path, restore, safe_name

    script = restore("/opt/runctl", "r-1; rm -rf /", [Download(0, "a b $(x).pt", "0" * 64, "https://h/k?X=1&Y=2")])
    subprocess.run(["dash", "-n"], input=script.encode(), check=True)
    assert "'r-1; rm -rf /'" in script and "'a b $(x).pt'" in script
    for outside in ("./a.pt", "/etc/cron.d/x", "../x", "a/b", ".runctl-sha256", "..", "a\nb"):
        with pytest.raises(ValueError):
            restore("/opt/runctl", "r-1", [Download(0, outside, "0" * 64, "https://h/k")])
    assert instance_path("r", "/data/x.pt") == "/data/x.pt"
    assert not safe_name("../x") and not safe_name("./../x") and not safe_name("/a/../b") and not safe_name("a/b")
    assert safe_name("ckpt.pt") and safe_name("./checkpoints/c.pt") and safe_name("/data/c.pt")
