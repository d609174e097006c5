"""Issue 11, the remote-shell findings, each reproduced as the attacker did it: through
`app.dispatch` (signed requests) or the jobs against the sandbox's executing SSM."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import redis as redis_mod
from pydantic import ValidationError
from rq import Queue
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers import remote
from workers.commands import Actor, StatusCommand, StopCommand, TrainCommand
from workers.jobs.status import status
from workers.jobs.stop import stop
from workers.jobs.train import train
from workers.queueing import QUEUE
from workers.services import Services
from workers.settings import Settings
from workers.state import locks
from workers.state.locks import op_lock
from workers.state.runs import RunState

from . import slack as s
from .conftest import TOKEN

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


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


# --- 3. stop with a disconnected SSM agent ----------------------------------------------

ADMIN = Actor(user_id="U0ADMIN", channel_id="C0TRAIN")
SLOW = ("--epochs", "200", "--steps-per-epoch", "4", "--step-seconds", "0.05", "--checkpoint-interval", "100")


def _train(iid: str, run_id: str) -> None:
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=SLOW)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)


def _pid_alive(sandbox: Sandbox, iid: str, run_id: str) -> bool:
    pid = int((sandbox.instance_dir(iid) / "runs" / run_id / "pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(iid: str, who: Actor = ALICE, **kw: object) -> str:
    return stop(StopCommand(instance_id=iid, **kw).model_dump(mode="json"), who.model_dump(mode="json"))


@pytest.mark.parametrize("agent", ["undeliverable", "offline"])
def test_stop_with_a_lost_agent_refuses_to_power_off_and_force_still_can(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, agent: str
) -> None:
    """undeliverable: SSM still lists the agent Online and takes the commands, which end
    Undeliverable (the old code read the empty output as "nothing alive" and powered off);
    offline: the agent is ConnectionLost."""
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = f"r-lost-{agent}"
    _train(iid, run_id)
    assert svc.runs.get(run_id).state is RunState.RUNNING  # type: ignore[union-attr]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "sandbox:ssm", "Value": agent}])

    _stop(iid)

    assert svc.fleet.get(iid).state == "running"
    assert _pid_alive(sandbox, iid, run_id)
    answer = slack.ephemerals("U0ALICE")[-1].text
    assert "was not stopped" in answer and "SSM agent" in answer, answer
    assert f"/runctl stop {iid} --force" in answer
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING
    assert not [m for m in slack.messages("C0TRAIN") if "stopped *gpu-box-1" in m.text]

    _stop(iid, ADMIN, force=True)

    assert svc.fleet.get(iid).state == "stopped"
    assert "not signalled" in json.dumps([m.blocks for m in slack.messages("C0TRAIN")]) + " ".join(
        m.text for m in slack.messages("C0TRAIN")
    )


# --- 13. the operation lock: taken by train, renewed while held -------------------------

STUBBORN = ("--epochs", "400", "--steps-per-epoch", "4", "--step-seconds", "0.05", "--ignore-sigterm")


def _stop_in_background(svc: Services, iid: str, run_id: str, grace: int) -> threading.Thread:
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=STUBBORN)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    assert svc.runs.get(run_id).state is RunState.RUNNING  # type: ignore[union-attr]
    stopping = threading.Thread(target=_stop, args=(iid,), kwargs={"grace": grace})
    stopping.start()
    lock = op_lock(svc.redis, iid)
    deadline = time.monotonic() + 10
    while (lock.holder() is None or lock.holder().operation != "stop") and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.02)
    return stopping


def test_train_force_during_a_stop_waits_for_it_instead_of_launching_under_it(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    """The old train took no operation lock: `--force` signalled the run a second time and
    launched while the stop went on to power the instance off under the new run."""
    iid = fleet_seed.instances["gpu-box-2"]
    stopping = _stop_in_background(svc, iid, "r-op-first", grace=3)
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", force=True)
    train(cmd.model_dump(mode="json"), ADMIN.model_dump(mode="json"), "r-op-second")
    stopping.join(60)

    second = svc.runs.get("r-op-second")
    assert second is not None and second.state is RunState.REFUSED, second
    assert second.error is not None and ("is stopped" in second.error.what or "busy: `stop`" in second.error.what)
    assert len([s for s in sandbox.sent_scripts(iid) if "signal_group" in s]) == 1  # Alice's stop only
    assert not (sandbox.instance_dir(iid) / "runs" / "r-op-second").exists()
    assert svc.fleet.get(iid).state == "stopped"


def test_the_operation_lock_is_held_for_the_whole_of_a_stop_longer_than_its_ttl(
    svc: Services, fleet_seed: SeedInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TTL scaled from 300 s to 0.6 s, grace 3 s: the lock must never lapse mid-stop."""
    monkeypatch.setattr(locks, "OP_TTL_MS", 600)
    iid = fleet_seed.instances["gpu-box-1"]
    stopping = _stop_in_background(svc, iid, "r-op-long", grace=3)
    lock = op_lock(svc.redis, iid)
    seen: list[str | None] = []
    until = time.monotonic() + 2.0  # more than three TTLs, still inside the 3 s grace
    while time.monotonic() < until:
        holder = lock.holder()
        seen.append(holder.operation if holder else None)
        time.sleep(0.05)
    assert stopping.is_alive()
    assert set(seen) == {"stop"}, seen
    stopping.join(60)
    assert svc.fleet.get(iid).state == "stopped"
    assert lock.holder() is None  # released once done


# --- 14. which instance ids exist; checkpoint hashes cached on the instance -------------


def test_unmanaged_and_missing_instances_get_the_same_answer_except_for_admins(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    unmanaged, missing = fleet_seed.instances["not-managed"], "i-0123456789abcdef0"

    def told(iid: str, who: Actor) -> str:
        status(StatusCommand(instance_id=iid).model_dump(mode="json"), who.model_dump(mode="json"))
        return slack.ephemerals(who.user_id)[-1].text.replace(iid, "<id>")

    assert told(unmanaged, ALICE) == told(missing, ALICE)
    assert "runctl manages no instance <id>" in told(missing, ALICE)
    # The run thread of a train is public: the same there.
    for iid, run_id in ((unmanaged, "r-exists-1"), (missing, "r-exists-2")):
        cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py")
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    first, second = (svc.runs.get(r) for r in ("r-exists-1", "r-exists-2"))
    assert first is not None and second is not None and first.error is not None and second.error is not None
    assert first.error.what.replace(unmanaged, "<id>") == second.error.what.replace(missing, "<id>")
    assert "create-tags" not in json.dumps([m.text for m in slack.messages("C0TRAIN")])
    # Admins keep the detail.
    assert "create-tags" in told(unmanaged, ADMIN) and "does not exist" in told(missing, ADMIN)
