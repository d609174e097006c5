"""Issue 25 items 6 and 9: a backup meets SSM's limits as AWS sets them. A listing longer than
the 24,000 characters SSM returns must not end a backup as "done" with files left behind, and
no command may pass SSM's 64 KB for a document and its parameters (the sandbox refuses it with
MaxDocumentSizeExceeded, as SendCommand does). Through signed `/runctl backup`, the inline RQ
worker, the executing SSM sandbox and moto S3."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from slack_bolt import App

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.ssm import MAX_DOCUMENT_BYTES
from workers.aws import backups
from workers.services import Services
from workers.state.runs import Run, RunState

from .test_backup import objects, presigned_urls
from .test_backup_poison import ALICE, QUICK, app, slash  # noqa: F401  (the fixture)
from .test_lifecycle import CHANNEL, SCRIPT, run_dir


def a_run_with_checkpoints(svc: Services, sandbox: Sandbox, iid: str, run_id: str, names: list[str]) -> Path:
    svc.runs.create(
        Run(
            run_id=run_id,
            instance_id=iid,
            user_id=ALICE,
            channel_id=CHANNEL,
            script="train.py",
            state=RunState.SUCCEEDED,
        )
    )
    ck = sandbox.instance_dir(iid) / "runs" / run_id / "checkpoints"
    ck.mkdir(parents=True)
    for i, name in enumerate(names):
        (ck / name).write_bytes(b"w" * (i + 1))
    return ck


def test_a_listing_longer_than_ssm_returns_backs_up_every_file_or_says_which_not(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,  # noqa: F811
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    # 90 names of 200 characters: their sum records alone pass SSM's 24,000 characters of output.
    names = [f"ckpt-{i:03d}-" + "x" * 188 + ".pt" for i in range(90)]
    a_run_with_checkpoints(svc, sandbox, iid, "r-backup-long", names)

    said = slash(app, slack, worker, f"backup {iid} --run r-backup-long", ALICE)

    stored = objects(svc, "r-backup-long")
    missing = [n for n in names if f"{backups.PREFIX}r-backup-long/ckpt/{n}" not in stored]
    if missing:  # then the backup must say so, never report success
        assert ":white_check_mark:" not in said and ("not backed up" in said or "failed" in said), said
    assert missing == [] and ":white_check_mark:" in said and f"uploaded {len(names)} files" in said, said
    manifest = backups.load(svc.fleet, "r-backup-long")
    assert manifest is not None and sorted(f.name for f in manifest.files) == sorted(names)


def test_upload_urls_past_64_kb_go_in_commands_ssm_accepts(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker's temporary credentials (an instance role's): each URL carries the session token.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjE" + "A" * 1100)
    iid = fleet_seed.instances["cpu-box"]
    names = [f"ckpt-epoch-{i:05d}.pt" for i in range(60)]
    a_run_with_checkpoints(svc, sandbox, iid, "r-backup-urls", names)

    said = slash(app, slack, worker, f"backup {iid} --run r-backup-urls", ALICE)

    assert ":white_check_mark:" in said and f"uploaded {len(names)} files" in said, said
    assert len(objects(svc, "r-backup-urls")) == len(names) + 1  # and the manifest
    urls = presigned_urls(sandbox, iid)
    assert len(urls) == len(names) and all("X-Amz-Security-Token" in parse_qs(urlparse(u).query) for u in urls)
    assert sum(len(u) for u in urls) > MAX_DOCUMENT_BYTES  # more than one command could carry
    uploads = [s for s in sandbox.sent_scripts(iid) if "X-Amz-Signature" in s]
    assert len(uploads) > 1 and all(len(json.dumps([s])) < MAX_DOCUMENT_BYTES for s in uploads)


def test_a_restore_of_many_files_goes_in_commands_ssm_accepts_and_the_run_resumes(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The restore path's presigned GETs, as many as the upload's, batched the same way."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjE" + "A" * 1100)
    iid, other = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["gpu-box-2"]
    slash(app, slack, worker, f"train {iid} {SCRIPT} -- {QUICK}", ALICE)
    run_id = svc.runs.history(iid)[0].run_id
    ck = run_dir(sandbox, iid, run_id) / "checkpoints"
    extra = [f"shard-{i:03d}.bin" for i in range(60)]
    for i, name in enumerate(extra):
        (ck / name).write_bytes(b"s" * (i + 1))
    said = slash(app, slack, worker, f"backup {iid} --run {run_id}", ALICE)
    assert ":white_check_mark:" in said and "not backed up" not in said, said
    names = sorted(p.name for p in ck.iterdir() if not p.name.startswith("."))  # not the hash cache
    files = len(names)

    slash(app, slack, worker, f"resume {run_id} --on {other}", ALICE)

    resumed = next(r for r in svc.runs.history(other) if r.checkpoint_run_id == run_id)
    assert resumed.state is RunState.SUCCEEDED, resumed.error
    assert any(f":inbox_tray: Restored {files} files" in n and "sha256 verified" in n for n in resumed.notes), (
        resumed.notes
    )
    restored = run_dir(sandbox, other, run_id) / "checkpoints"
    assert sorted(p.name for p in restored.iterdir() if not p.name.startswith(".")) == names
    gets = [s for s in sandbox.sent_scripts(other) if "X-Amz-Signature" in s]
    assert len(gets) > 1 and all(len(json.dumps([s])) < MAX_DOCUMENT_BYTES for s in gets)


def test_a_listing_without_its_end_record_counts_as_cut() -> None:
    from workers.remote.backup import parse_sums

    whole = "::runctl::more 0\n::runctl::known 0\n::runctl::sum 3 1 - bYS5wdA==\n::runctl::end\n"
    assert parse_sums(whole).complete and len(parse_sums(whole).files) == 1
    assert not parse_sums(whole[: whole.index("::runctl::end")]).complete
    assert not parse_sums(whole[:30]).complete


def test_a_file_the_manifest_counts_but_s3_lost_is_reported_then_uploaded_again(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    app: App,  # noqa: F811
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    names = ["ckpt-a.pt", "ckpt-b.pt"]
    a_run_with_checkpoints(svc, sandbox, iid, "r-backup-lost", names)
    first = slash(app, slack, worker, f"backup {iid} --run r-backup-lost", ALICE)
    assert ":white_check_mark:" in first and "uploaded 2 files" in first, first
    lost = f"{backups.PREFIX}r-backup-lost/ckpt/ckpt-a.pt"
    svc.fleet.s3.delete_object(Bucket=svc.settings.RUNCTL_S3_BUCKET, Key=lost)

    second = slash(app, slack, worker, f"backup {iid} --run r-backup-lost", ALICE)
    assert ":white_check_mark:" not in second and "`ckpt-a.pt` not backed up" in second, second
    third = slash(app, slack, worker, f"backup {iid} --run r-backup-lost", ALICE)
    assert ":white_check_mark:" in third and "uploaded 1 file" in third, third
    assert lost in objects(svc, "r-backup-lost")
