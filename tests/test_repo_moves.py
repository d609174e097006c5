"""The worker's git mirror follows RUNCTL_REPO: one mirror per repository URL."""

from __future__ import annotations

import shutil
from pathlib import Path

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.inline import InlineWorker
from workers.code.repo import mirror_name
from workers.services import Services
from workers.state.runs import RunState

from .test_envs import commit
from .test_train_flow import start

QUICK = ("--epochs", "1", "--steps-per-epoch", "1", "--step-seconds", "0")


def test_a_moved_repository_is_fetched_from_its_new_url(
    svc: Services, fleet_seed: SeedInfo, example_repo: Path, tmp_path: Path, worker: InlineWorker
) -> None:
    old_url = tmp_path / "old-home" / "training-code"
    shutil.copytree(example_repo, old_url)
    svc.settings = svc.settings.model_copy(update={"RUNCTL_REPO": str(old_url)})
    iid = fleet_seed.instances["cpu-box"]
    first = start(iid, "train_with_checkpoints.py", *QUICK)
    worker.drain()
    assert svc.runs.get(first).state is RunState.SUCCEEDED  # type: ignore[union-attr]

    new_url = tmp_path / "new-home" / "training-code"
    new_url.parent.mkdir()
    old_url.rename(new_url)  # the repository moved; the old URL is gone
    commit(new_url, {"moved.py": "print('from the new home')\n"})
    svc.settings = svc.settings.model_copy(update={"RUNCTL_REPO": str(new_url)})
    second_id = start(iid, "moved.py")
    worker.drain()
    second = svc.runs.get(second_id)
    assert second is not None
    assert second.state is RunState.SUCCEEDED, second.error
    mirrors = svc.settings.RUNCTL_MIRROR_DIR
    assert {p.name for p in mirrors.glob("*.git")} == {mirror_name(str(old_url)), mirror_name(str(new_url))}
