"""Issue 31, a newcomer's first day: what read wrong, each through the real entry points
(signed commands and clicks to the Bolt app, jobs run by the worker against the sandbox)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_mod
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo, seed_launch
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from tests.conftest import TOKEN
from tests.slack import command, dispatched
from workers.services import Services
from workers.settings import Settings
from workers.state.runs import Run

IID = "i-0123456789abcdef0"


def make(settings: Settings, redis: redis_mod.Redis, slack: FakeSlack) -> App:
    return build_app(settings, redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)


def text(response: Any) -> str:
    return str(json.loads(response.body)["text"]) if response.body else ""


# --- item 14: words --------------------------------------------------------------------


def test_a_misspelled_flag_before_the_separator_is_fixed_with_one_separator(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = make(settings, real_redis, slack)
    said = text(app.dispatch(command(f"train {IID} train.py --forse -- --epochs 3")))
    assert "Did you mean `--force`?" in said
    # for the script: `--` once, before --forse (the later `--` would reach the script as an argument)
    assert f"`/runctl train {IID} train.py -- --forse --epochs 3`" in said
    assert "--forse -- " not in said
    assert f"/runctl train {IID} train.py --force -- --epochs 3" in said


def test_a_bad_value_names_the_option_as_typed_not_a_field(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = make(settings, real_redis, slack)
    said = text(app.dispatch(command(f"train {IID} train.py --checkpoint-interval 0 -- --epochs 3")))
    assert "`--checkpoint-interval`" in said and "checkpoint_interval" not in said
    said = text(app.dispatch(command(f"autostop {IID} 2")))
    assert "`<minutes>`" in said and "Bad value for minutes" not in said


def _drained(app: App, worker: InlineWorker, text_: str, user: str) -> None:
    dispatched(app, worker, command(text_, user=user))


def test_the_audit_shows_a_mention_and_escaped_text_once(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    app = make(svc.settings, svc.redis, slack)
    iid = fleet_seed.instances["gpu-box-1"]
    _drained(app, worker, f"autostop {iid} 30", "U0ADMIN")
    _drained(app, worker, "audit 5", "U0ADMIN")
    (note,) = slack.ephemerals("U0ADMIN")[-1:]
    body = "\n".join(b["text"]["text"] for b in note.blocks if b["type"] == "section")
    assert f"`/runctl autostop {iid} 30` → :alarm_clock: <@U0ADMIN> set autostop on *gpu-box-1" in body
    assert "&lt;@" not in body and "&amp;" not in body


# --- item 9: a script with no SIGTERM handler ---------------------------------------------


def everywhere(slack: FakeSlack) -> list[Message]:
    return [m for channel in ("C0TRAIN", "C0OPS") for m in slack.messages(channel)]


def _ckpt(sandbox: Sandbox, iid: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not list(sandbox.instance_dir(iid).glob(f"runs/*/checkpoints/{name}")):
        assert time.monotonic() < deadline, f"no {name} on {iid}"
        time.sleep(0.1)


def _epoch(sandbox: Sandbox, iid: str, epoch: int, timeout: float = 60) -> None:
    """Until the run's progress file says it is in `epoch` or later."""
    deadline = time.monotonic() + timeout
    while True:
        for path in sandbox.instance_dir(iid).glob("runs/*/progress.json"):
            with contextlib.suppress(OSError, ValueError):
                if int(json.loads(path.read_text()).get("epoch", 0)) >= epoch:
                    return
        assert time.monotonic() < deadline, f"no epoch {epoch} on {iid}"
        time.sleep(0.05)


@contextmanager
def _no_handler_training(
    svc: Services, slack: FakeSlack, worker: InlineWorker, sandbox: Sandbox, iid: str
) -> Iterator[App]:
    """`no_handler.py` (no SIGTERM handler) training on `iid` with one checkpoint, epoch 3, the
    worker running until the block ends; the app to send more commands to."""
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2  # as the console's
    app = make(svc.settings, svc.redis, slack)
    worker.start(0.05)
    try:
        app.dispatch(command(f"train {iid} no_handler.py -- 400", user="U0ADMIN"))
        _ckpt(sandbox, iid, "ckpt-epoch-00003.json")
        _epoch(sandbox, iid, 6)  # epochs 4 and 5 done after the checkpoint: a stop now loses them
        yield app
    finally:
        worker.stop()


def test_force_and_terminate_tell_a_script_with_no_handler_what_it_has(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    with _no_handler_training(svc, slack, worker, sandbox, iid) as app:
        app.dispatch(command(f"terminate {iid}", user="U0ADMIN"))
        asks = slack.wait_for(
            lambda: [m for m in everywhere(slack) if "asks to *terminate" in json.dumps(m.blocks)], 60
        )
        said = json.dumps(asks[-1].blocks)
        assert "saves first" not in said  # no promise the script cannot keep
        assert "a script that handles it can save a checkpoint" in said

        app.dispatch(command(f"train --force {iid} no_handler.py -- 3", user="U0ADMIN"))

        def note() -> str:
            found = [t for m in everywhere(slack) if "`--force` stopped run" in (t := m.text + json.dumps(m.blocks))]
            return found[-1] if found else ""

        said = slack.wait_for(note, 90)
        assert "saved no checkpoint" not in said
        assert "its newest checkpoint is `ckpt-epoch-00003.json`, epoch 3" in said


def test_status_after_a_start_counts_from_that_start(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    """Real EC2 resets LaunchTime on every start (boto3: "The time that the instance was last
    launched"); the sandbox does too, so "since last start" is what it says."""
    app = make(svc.settings, svc.redis, slack)
    iid = fleet_seed.instances["old-box"]  # seeded, then stopped
    time.sleep(6)
    _drained(app, worker, f"start {iid}", "U0ADMIN")
    _drained(app, worker, f"status {iid}", "U0ADMIN")
    said = "\n".join(m.text + json.dumps(m.blocks) for m in slack.ephemerals("U0ADMIN")[-1:])
    up = re.search(r"Up (\d+)s \(since last start\)", said)
    assert up is not None, said
    assert int(up.group(1)) < 5


# --- item 8 and 9: resume ------------------------------------------------------------


def test_resume_checks_its_target_before_announcing_and_names_its_sha_once(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    app = make(svc.settings, svc.redis, slack)
    box, stopped = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["old-box"]
    args = "-- --epochs 2 --steps-per-epoch 2 --step-seconds 0.05"
    _drained(app, worker, f"train {box} train_with_checkpoints.py {args}", "U0ADMIN")
    first = slack.wait_for(lambda: svc.runs.latest(box), 30)
    assert first is not None
    slack.wait_for(lambda: (r := svc.runs.get(first.run_id)) is not None and r.state.ended, 60)

    _drained(app, worker, f"resume {first.run_id} --on {stopped}", "U0ADMIN")
    said = "\n".join(m.text for m in [*everywhere(slack), *slack.ephemerals("U0ADMIN")])
    assert "is stopped." in said and f"/runctl start {stopped}" in said
    assert "resumes run" not in said  # nothing announced that could not happen

    _drained(app, worker, f"resume {first.run_id}", "U0ADMIN")

    def second() -> Run | None:
        r = svc.runs.latest(box)
        return r if r is not None and r.run_id != first.run_id else None

    resumed = slack.wait_for(second, 30)
    assert resumed is not None
    assert resumed.ref == resumed.sha and resumed.sha is not None
    shown = "\n".join(json.dumps(m.blocks) for m in everywhere(slack) if resumed.run_id in json.dumps(m.blocks))
    assert f"ref `{resumed.sha[:10]}`" in shown and resumed.sha not in shown


# --- item 14: progress read from the log ---------------------------------------------------

KERAS_LIKE = """import time
print("Epoch 1/8", flush=True)
for step in range(1, 40):
    print(f"{step}/100 [==>...........] - ETA: 30s - lr: 0.0500 - loss: 0.6931", flush=True)
    time.sleep(0.25)
"""


def test_progress_from_a_log_counts_an_epoch_that_just_started_and_shows_the_loss(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo, tmp_path: Path
) -> None:
    repo = tmp_path / "keras-like"
    repo.mkdir()
    (repo / "fit.py").write_text(KERAS_LIKE)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "fit"]):
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], check=True
        )
    svc.settings = svc.settings.model_copy(
        update={"RUNCTL_REPO": str(repo), "RUNCTL_POLL_MIN_SECONDS": 1, "RUNCTL_POLL_MAX_SECONDS": 1}
    )
    app = make(svc.settings, svc.redis, slack)
    iid = fleet_seed.instances["gpu-box-1"]
    worker.start(0.05)
    try:
        app.dispatch(command(f"train {iid} fit.py", user="U0ADMIN"))

        def progress() -> str:
            for m in everywhere(slack):
                shown = json.dumps(m.blocks, ensure_ascii=False)
                if "epoch 1/8" in shown:
                    return shown
            return ""

        shown = slack.wait_for(progress, 60)
    finally:
        worker.stop()
    assert "0%`  epoch 1/8" in shown and "12%" not in shown  # epoch 1 of 8 has just started
    assert "epoch 1/8  ·  loss 0.6931" in shown  # the loss first, before the learning rate


# --- item 5: autostop, as set and as shown --------------------------------------------------


def test_a_short_autostop_promises_what_the_sweep_does_and_status_shows_it(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    app = make(svc.settings, svc.redis, slack)
    iid = fleet_seed.instances["cpu-box"]
    _drained(app, worker, f"status {iid}", "U0ADMIN")
    assert "Autostop: off" in slack.ephemerals("U0ADMIN")[-1].text + json.dumps(slack.ephemerals("U0ADMIN")[-1].blocks)
    _drained(app, worker, f"autostop {iid} 5", "U0ADMIN")
    said = "\n".join(m.text for m in everywhere(slack) if "set autostop" in m.text)
    assert "10 min before" not in said  # a 5-minute autostop cannot warn 10 minutes ahead
    assert "no sooner than 10 min after it" in said
    _drained(app, worker, f"status {iid}", "U0ADMIN")
    shown = slack.ephemerals("U0ADMIN")[-1]
    assert "Autostop: after 5 min with no live run (set by <@U0ADMIN>)" in shown.text + json.dumps(shown.blocks)


# --- item 6: a refused run never displaces the last real one --------------------------------


def test_a_train_refused_on_a_stopped_box_leaves_the_resume_offer_and_status_alone(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    app = make(svc.settings, svc.redis, slack)
    iid = fleet_seed.instances["gpu-box-1"]
    slow = "-- --epochs 40 --steps-per-epoch 4 --step-seconds 0.1"
    worker.start(0.05)
    try:
        app.dispatch(command(f"train {iid} train_with_checkpoints.py {slow}", user="U0ADMIN"))
        _ckpt(sandbox, iid, "ckpt-epoch-00001.json")
        first = svc.runs.latest(iid)
        assert first is not None
        app.dispatch(command(f"stop {iid}", user="U0ADMIN"))
        slack.wait_for(lambda: svc.fleet.get(iid).state == "stopped", 90)
        app.dispatch(command(f"train {iid} train_with_checkpoints.py -- --epochs 3", user="U0ADMIN"))
        slack.wait_for(lambda: any("is stopped." in m.text for m in slack.ephemerals("U0ADMIN")), 60)
        app.dispatch(command(f"start {iid}", user="U0ADMIN"))

        def started() -> str:
            found = [json.dumps(m.blocks) for m in everywhere(slack) if "started *gpu-box-1" in json.dumps(m.blocks)]
            return found[-1] if found else ""

        offer = slack.wait_for(started, 90)
    finally:
        worker.stop()
    assert f"Run `{first.run_id}`" in offer and "Resume training" in offer
    _drained(app, worker, f"status {iid}", "U0ADMIN")
    shown = slack.ephemerals("U0ADMIN")[-1]
    assert f"Last: `{first.run_id}` stopped." in shown.text + json.dumps(shown.blocks)


# --- item 4: the launch template is checked before [Launch] is offered -----------------------


def test_a_launch_file_with_a_missing_subnet_or_profile_is_refused_before_the_click(
    svc: Services, slack: FakeSlack, worker: InlineWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    made = seed_launch(sandbox.endpoint_url, "us-east-1")
    path = tmp_path / "launch.toml"

    def ask(subnet: str, profile: str) -> str:
        path.write_text(
            f'[template]\nami = "{made.ami}"\nsubnets = ["{subnet}"]\nsecurity_groups = ["{made.security_group}"]\n'
            f'instance_profile = "{profile}"\n[presets.gpu]\ninstance_type = "g5.xlarge"\n'
        )
        svc.settings = svc.settings.model_copy(update={"RUNCTL_LAUNCH_FILE": path})
        _drained(make(svc.settings, svc.redis, slack), worker, "launch gpu", "U0ADMIN")
        note = slack.ephemerals("U0ADMIN")[-1]
        return note.text + json.dumps(note.blocks)

    said = ask("subnet-0000000000000000a", made.instance_profile)  # the README's example names such subnets
    assert "subnet `subnet-0000000000000000a` does not exist" in said and "Fix:" in said
    said = ask(made.subnets[0], "no-such-profile")
    assert "instance profile `no-such-profile` does not exist" in said and "Fix:" in said
    assert not [m for m in everywhere(slack) if "asks to *launch" in json.dumps(m.blocks)]  # nothing to click


# --- item 7: checkpoints restored from S3 are in S3 ------------------------------------------


def test_checkpoints_restored_from_s3_count_as_backed_up(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    app = make(svc.settings, svc.redis, slack)
    box, other = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["gpu-box-2"]
    args = "-- --epochs 3 --steps-per-epoch 2 --step-seconds 0.05"
    _drained(app, worker, f"train {box} train_with_checkpoints.py --backup {args}", "U0ADMIN")
    first = slack.wait_for(lambda: svc.runs.latest(box), 30)
    assert first is not None
    slack.wait_for(lambda: (r := svc.runs.get(first.run_id)) is not None and r.state.ended, 60)
    _drained(app, worker, f"backup {box}", "U0ADMIN")  # everything in S3, whatever --backup raced
    _drained(app, worker, f"resume {first.run_id} --on {other}", "U0ADMIN")
    resumed = slack.wait_for(lambda: svc.runs.latest(other), 30)
    assert resumed is not None
    slack.wait_for(lambda: (r := svc.runs.get(resumed.run_id)) is not None and r.state.ended, 60)

    _drained(app, worker, f"checkpoints {other}", "U0ADMIN")
    note = slack.ephemerals("U0ADMIN")[-1]
    listed = note.text + json.dumps(note.blocks, ensure_ascii=False)
    assert "ckpt-epoch-00003.json" in listed
    assert "instance only" not in listed  # restored from S3, so S3 holds them as they are here
    _drained(app, worker, f"terminate {other}", "U0ADMIN")
    asks = [json.dumps(m.blocks) for m in everywhere(slack) if "asks to *terminate" in json.dumps(m.blocks)]
    assert asks and "would be lost" not in asks[-1]


# --- item 9: stop says plainly that a script with no SIGTERM handler could not save -------------


def test_stop_of_a_script_with_no_handler_says_it_could_not_save_and_names_what_it_has(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    with _no_handler_training(svc, slack, worker, sandbox, iid) as app:
        app.dispatch(command(f"stop {iid}", user="U0ADMIN"))

        def summary() -> str:
            found = [t for m in everywhere(slack) if "stopped *cpu-box" in (t := m.text + json.dumps(m.blocks))]
            return found[-1] if found else ""

        said = slack.wait_for(summary, 90)
    # the thread's notice as the stop begins: no "up to 120 s to save" for a script that cannot
    notice = [m.text for m in everywhere(slack) if m.thread_ts and "is stopping" in m.text]
    assert notice, [m.text for m in slack.messages("C0TRAIN")]
    assert "s to save" not in notice[-1]
    assert "`no_handler.py` has no SIGTERM handler, so it cannot save a checkpoint now" in notice[-1]
    # the report: no handler, so no save; the checkpoint it does have, by name and epoch
    assert "wrote no checkpoint on SIGTERM" not in said
    assert "`no_handler.py` has no SIGTERM handler, so it could not save a checkpoint when stopped." in said
    assert re.search(r"Its newest checkpoint is `ckpt-epoch-00003\.json` \([^)]*epoch 3, ", said), said


# --- item 7, third part: the resumed run's final reply names its newest checkpoint ---------------


@pytest.mark.parametrize("where", ["same box", "another box, restored from S3"])
def test_a_resumed_run_that_finishes_names_its_newest_checkpoint(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, where: str
) -> None:
    """Stop with checkpoints, start, resume (on the box, or on another from the S3 backup),
    let it finish: the final reply and the parent name epoch 20 (the script keeps its newest 3:
    18, 19 and 20), never an older one."""
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    app = make(svc.settings, svc.redis, slack)
    box = fleet_seed.instances["gpu-box-1"]
    iid = box if where == "same box" else fleet_seed.instances["gpu-box-2"]
    worker.start(0.05)
    try:
        args = "-- --epochs 20 --steps-per-epoch 4 --step-seconds 0.15"
        app.dispatch(command(f"train {box} train_with_checkpoints.py --backup {args}", user="U0ADMIN"))
        _ckpt(sandbox, box, "ckpt-epoch-00004.json")
        first = svc.runs.latest(box)
        assert first is not None
        app.dispatch(command(f"stop {box}", user="U0ADMIN"))
        slack.wait_for(lambda: svc.fleet.get(box).state == "stopped", 90)
        app.dispatch(command(f"start {box}", user="U0ADMIN"))
        slack.wait_for(lambda: svc.fleet.get(box).state == "running" and svc.runs.live_on(box) is None, 90)
        if iid != box:
            app.dispatch(command(f"backup {box}", user="U0ADMIN"))  # everything in S3, whatever --backup raced
            slack.wait_for(lambda: [m for m in slack.ephemerals("U0ADMIN") if "Backup of" in m.text], 60)
        time.sleep(1)
        on = f" --on {iid}" if iid != box else ""
        app.dispatch(command(f"resume {first.run_id}{on}", user="U0ADMIN"))

        def resumed() -> Run | None:
            found = svc.runs.latest(iid)
            return found if found is not None and found.run_id != first.run_id and found.state.ended else None

        run = slack.wait_for(resumed, 120)
        assert run is not None and run.message_ts is not None
        ts = run.message_ts
        final = slack.wait_for(
            lambda: [m.text for m in slack.thread("C0TRAIN", ts) if "finished (exit 0)" in m.text], 30
        )
    finally:
        worker.stop()
    assert run.checkpoint_run_id == first.run_id, run
    assert "Checkpoint: `ckpt-epoch-00020.json`" in final[-1], final[-1]
    assert run.checkpoint is not None and run.checkpoint.name == "ckpt-epoch-00020.json", run.checkpoint
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    assert "ckpt-epoch-00020.json" in json.dumps(parent.blocks) and "ckpt-epoch-00018" not in json.dumps(parent.blocks)
