"""Issue 11, the remote-shell findings, each reproduced as the attacker did it: through
`app.dispatch` (signed requests) or the jobs against the sandbox's executing SSM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis as redis_mod
from pydantic import ValidationError
from rq import Queue
from slack_sdk import WebClient

from bot.app import build_app
from workers import remote
from workers.commands import Requester
from workers.jobs.train import train
from workers.queueing import QUEUE
from workers.sandbox.aws import Sandbox, SeedInfo
from workers.sandbox.fake_slack import FakeSlack
from workers.services import Services
from workers.settings import Settings

from . import slack as s
from .conftest import TOKEN

ALICE = Requester(user_id="U0ALICE", channel_id="C0TRAIN")


def attack(marker: Path) -> str:
    return f"$(id > {marker}).py"


# --- 1. root shell through the script path ------------------------------------------


def test_the_script_path_attack_is_refused_at_the_front_door(
    settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    app = build_app(settings, fake_redis, client=WebClient(token=TOKEN, base_url=slack.base_url))
    for flags in ("--no-sync-code", ""):
        resp = app.dispatch(s.command(f"train i-0123456789abcdef0 '{attack(marker)}' {flags}"))
        assert resp.status == 200
        text = str(json.loads(resp.body)["text"])
        assert "may hold only letters, digits and `._-/`" in text, text
    time.sleep(0.2)  # the listener would have queued by now
    assert Queue(QUEUE, connection=fake_redis).count == 0
    assert not marker.exists()


def test_a_train_job_handed_the_attack_refuses_it(svc: Services) -> None:
    """The job re-validates what it is given: a payload that skipped the grammar is refused."""
    with pytest.raises(ValidationError, match="letters, digits"):
        train(
            {"instance_id": "i-0123456789abcdef0", "script": "$(id).py", "sync_code": False},
            ALICE.model_dump(mode="json"),
            "r-attack",
        )


def test_a_builder_handed_the_attack_executes_nothing(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, tmp_path: Path
) -> None:
    """`--no-sync-code` ships nothing, so the missing-script branch runs on the instance:
    it must print the path, not run it."""
    marker = tmp_path / "pwned"
    iid = fleet_seed.instances["gpu-box-1"]
    script = attack(marker)
    launch = remote.launch_body("r-attack", script, ["`touch pwned`"], {}, json.dumps({"script": script}))
    result = svc.fleet.run(iid, remote.deliver(svc.settings.RUNCTL_REMOTE_ROOT, "r-attack", script, None, launch))
    assert result.exit_code == 3, result
    assert f"runctl: script {script} is not in" in result.stderr
    assert not marker.exists()
    assert not list(sandbox.instance_dir(iid).rglob("pwned"))
