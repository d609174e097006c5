"""Stop (checkpoint on SIGTERM), start and [Resume training], against moto plus the
executing-SSM shim (scripts really run under dash), real Redis and the fake Slack."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, StartCommand, StopCommand, TrainCommand
from workers.jobs.start import start
from workers.jobs.stop import stop
from workers.jobs.train import train
from workers.remote.lifecycle import stop_run
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.locks import train_lock
from workers.state.runs import RunState

from .conftest import TOKEN
from .slack import action, click

CHANNEL = "C0TRAIN"
ALICE = Actor(user_id="U0ALICE", channel_id=CHANNEL)
SCRIPT = "train_with_checkpoints.py"
# No periodic checkpoints: whatever is saved, SIGTERM saved it.
SLOW = ("--epochs", "40", "--steps-per-epoch", "4", "--step-seconds", "0.05", "--checkpoint-interval", "100")
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ ", re.MULTILINE)


def train_on(iid: str, *args: str, run_id: str = "r-life-1", who: Actor = ALICE) -> str:
    cmd = TrainCommand(instance_id=iid, script=SCRIPT, args=args)
    train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), run_id)
    return run_id


def run_dir(sandbox: Sandbox, iid: str, run_id: str) -> Path:
    return sandbox.instance_dir(iid) / "runs" / run_id


def wait_for_epoch(sandbox: Sandbox, iid: str, run_id: str, epoch: int, timeout: float = 30) -> None:
    log = run_dir(sandbox, iid, run_id) / "training.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and any(int(e) >= epoch for e in EPOCH_LINE.findall(log.read_text())):
            return
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached epoch {epoch}")


def epochs_in_log(sandbox: Sandbox, iid: str, run_id: str) -> list[int]:
    return [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, iid, run_id) / "training.log").read_text())]


def as_dict(m: Message) -> dict[str, Any]:
    return {"type": "message", "ts": m.ts, "text": m.text, "blocks": m.blocks}


def text_of(m: Message) -> str:
    return m.text + " " + json.dumps(m.blocks)


def posted(slack: FakeSlack, needle: str, channel: str = CHANNEL) -> Message:
    found = [m for m in slack.messages(channel) if needle in text_of(m)]
    assert found, f"no message with {needle!r} in {[m.text for m in slack.messages(channel)]}"
    return found[-1]


def send_click(svc: Services, slack: FakeSlack, worker: InlineWorker, payload: dict[str, Any]) -> None:
    """A signed block_actions request through the real Bolt app; returns once its job is queued
    (or, for a click the app refused, once it answered)."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    user = payload["user"]["id"]
    before = (worker.pending(), len(slack.ephemerals(user)))
    if app.dispatch(action(payload)).status != 200:
        return  # refused by the middleware before any listener ran
    deadline = time.monotonic() + 3
    # Bolt runs the listener after the ack, in its own thread: wait for its job or its refusal.
    while (worker.pending(), len(slack.ephemerals(user))) == before and time.monotonic() < deadline:
        time.sleep(0.02)


def dispatch(svc: Services, slack: FakeSlack, worker: InlineWorker, payload: dict[str, Any]) -> None:
    """A click, then run what it queued."""
    send_click(svc, slack, worker, payload)
    worker.drain(timeout=120)


def stop_cmd(iid: str, who: Actor = ALICE, **kw: Any) -> str:
    return stop(StopCommand(instance_id=iid, **kw).model_dump(mode="json"), who.model_dump(mode="json"))


def test_stop_during_a_run_saves_a_checkpoint_on_sigterm_and_stops_the_instance(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = train_on(iid, *SLOW)
    wait_for_epoch(sandbox, iid, run_id, 2)

    stop_cmd(iid)

    assert svc.fleet.get(iid).state == "stopped"
    saved = sorted(p.name for p in (run_dir(sandbox, iid, run_id) / "checkpoints").glob("ckpt-epoch-*.json"))
    assert len(saved) == 1, saved  # the interval is 100: only SIGTERM can have saved it
    summary = posted(slack, "stopped *gpu-box-1")
    text = text_of(summary)
    assert f"saved `{saved[0]}`" in text and "on SIGTERM" in text
    assert "<@U0ALICE>" in text and "Up this session" in text and "$1.006/h" in text
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED and run.ended_by == "stop"
    assert run.checkpoint is not None and run.checkpoint.name == saved[0]
    assert train_lock(svc.redis, iid).holder() is None
    parent = next(m for m in slack.messages(CHANNEL) if m.ts == run.message_ts)
    assert "Stopped" in text_of(parent)
    assert any(saved[0] in m.text for m in slack.thread(CHANNEL, parent.ts))
    # the stop script really ran on the instance, under dash
    assert any('kill -"$1" -"$pgid"' in s for s in sandbox.sent_scripts(iid))


def test_stop_with_the_default_interval_reports_the_checkpoint_it_already_had(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    # Interval 1 (runctl's default). 3 s epochs: the signal lands early in the next epoch, not in
    # its last step (which would finish and save that epoch instead).
    run_id = train_on(iid, "--epochs", "40", "--steps-per-epoch", "20", "--step-seconds", "0.15")
    wait_for_epoch(sandbox, iid, run_id, 2)

    stop_cmd(iid)

    text = text_of(posted(slack, "stopped *gpu-box-1"))
    found = re.search(
        r"the newest checkpoint \(epoch (\d+), `ckpt-epoch-(\d+)\.json`\) was already saved; "
        r"the partial epoch (\d+) is discarded",
        text,
    )
    assert found and int(found[1]) == int(found[2]) >= 2 and int(found[3]) == int(found[1]) + 1, text
    assert "SIGTERM handler" not in text and ":rotating_light:" not in text and "is lost" not in text


def test_a_script_without_a_handler_still_gets_the_loud_loss_report(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    cmd = TrainCommand(instance_id=iid, script="no_handler.py", args=("100",))
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-no-handler")
    wait_for_epoch(sandbox, iid, "r-no-handler", 4)  # epoch 3 saved, the only checkpoint it writes

    stop_cmd(iid)

    text = text_of(posted(slack, "stopped *gpu-box-2"))
    assert ":rotating_light:" in text and "has no SIGTERM handler, so it could not save" in text, text
    assert re.search(r"Its newest checkpoint is `ckpt-epoch-00003.json` \([^)]*epoch 3, ", text), text
    assert "progress after it is lost" in text and "already saved" not in text


def test_a_script_that_ignores_sigterm_is_killed_and_the_loss_is_reported(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_id = train_on(
        iid,
        "--epochs",
        "40",
        "--steps-per-epoch",
        "4",
        "--step-seconds",
        "0.75",
        "--checkpoint-interval",
        "2",
        "--ignore-sigterm",
    )
    wait_for_epoch(sandbox, iid, run_id, 3)  # saved epoch 2, finished 3; epoch 4 ends 3 s later, after the grace

    stop_cmd(iid, grace=1)

    text = text_of(posted(slack, "stopped *gpu-box-2"))
    assert "did not exit within 1 s of SIGTERM" in text and "SIGKILL" in text
    assert "wrote no checkpoint after the signal" in text and re.search(r"progress since epoch \d+ ", text)
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED and run.exit_code == 137
    assert svc.fleet.get(iid).state == "stopped"


def test_stop_of_a_stopped_instance_is_a_no_op(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    iid = fleet_seed.instances["old-box"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": "U0ALICE"}])  # hers
    assert "already stopped" in stop_cmd(iid)
    assert any("already stopped" in m.text for m in slack.ephemerals("U0ALICE"))
    assert not slack.calls_to("chat.postMessage")


def test_stop_with_force_needs_an_admin(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    iid = fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": "U0ALICE"}])  # hers
    stop_cmd(iid, force=True)
    assert any("`force`" in m.text and "admin" in m.text for m in slack.ephemerals("U0ALICE"))
    assert svc.fleet.get(iid).state == "running"


def test_start_only_from_stopped(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    iid = fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": "U0ALICE"}])  # hers
    start(StartCommand(instance_id=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    assert any("already running" in m.text for m in slack.ephemerals("U0ALICE"))


def test_start_then_resume_continues_from_the_checkpoint_epoch(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    epochs = ("--epochs", "6", "--steps-per-epoch", "4", "--step-seconds", "0.05", "--checkpoint-interval", "100")
    first = train_on(iid, *epochs)
    wait_for_epoch(sandbox, iid, first, 2)
    stop_cmd(iid)
    assert svc.fleet.get(iid).state == "stopped"
    stopped_at = epochs_in_log(sandbox, iid, first)

    start(StartCommand(instance_id=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    report = posted(slack, "started *gpu-box-1")
    assert "SSM agent Online" in report.text and svc.fleet.get(iid).state == "running"
    dispatch(svc, slack, worker, click(as_dict(report), ActionId.RESUME_TRAINING, "U0ALICE"))

    resumed = [r for r in svc.runs.history(iid) if r.run_id != first]
    assert len(resumed) == 1
    second = resumed[0]
    assert second.state is RunState.SUCCEEDED, second.error
    assert second.checkpoint_run_id == first and second.args == svc.runs.get(first).args  # type: ignore[union-attr]
    log = (run_dir(sandbox, iid, second.run_id) / "training.log").read_text()
    assert "resuming from" in log and f"(epoch {stopped_at[-1]})" in log
    assert stopped_at + epochs_in_log(sandbox, iid, second.run_id) == [1, 2, 3, 4, 5, 6]
    # the button is gone and says who resumed
    assert "resumed run" in text_of(next(m for m in slack.messages(CHANNEL) if m.ts == report.ts))
    assert "resume_training" not in json.dumps(next(m for m in slack.messages(CHANNEL) if m.ts == report.ts).blocks)


def test_stop_script_is_posix_sh() -> None:
    for force in (False, True):
        script = stop_run("/opt/runctl", "r-1; rm -rf /", 5, force=force)
        assert script.startswith("RUNCTL_ROOT=/opt/runctl\n")
        assert "'r-1; rm -rf /'" in script
        subprocess.run(["dash", "-n"], input=script.encode(), check=True)
