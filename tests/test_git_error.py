"""A git failure in the worker's mirror is a typed error with what, why and fix."""

from __future__ import annotations

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.code.repo import CodeRepo
from workers.commands import Actor, TrainCommand
from workers.errors import CodeError
from workers.queueing import enqueue_command as enqueue
from workers.services import Services
from workers.state.runs import RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


def test_a_broken_mirror_is_told_with_what_why_and_fix_not_as_an_internal_error(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    repo = svc.repo
    repo.sync()
    sha = repo.resolve("main")
    readme = repo._git("rev-parse", f"{sha}:README.md").decode().strip()
    (repo.mirror / "objects" / readme[:2] / readme[2:]).unlink()  # the disk lost one object
    svc.fleet.s3.delete_object(Bucket=fleet_seed.bucket, Key=f"runctl/bundles/{sha}.tar.gz")
    iid = fleet_seed.instances["gpu-box-1"]

    enqueue(svc.queue, TrainCommand(instance_id=iid, script="train_with_checkpoints.py"), ALICE, "r-git")
    worker.drain()

    run = svc.runs.get("r-git")
    assert run is not None and run.state is RunState.REFUSED and run.error is not None
    assert run.error.kind == "GitError" and "`git archive` failed" in run.error.what
    assert "RUNCTL_MIRROR_DIR" in run.error.fix
    told = slack.thread("C0TRAIN", run.message_ts or "")[-1].text
    assert "`git archive` failed" in told and "Fix:" in told and "internal error" not in told
    assert issubclass(type(_raise(repo, sha)), CodeError)


def _raise(repo: CodeRepo, sha: str) -> Exception:
    try:
        repo.archive(sha)
    except Exception as exc:
        return exc
    raise AssertionError("archive should fail on a mirror missing an object")
