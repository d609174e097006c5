"""Who may stop, start and resume (issue 11, findings 5 and 7), through the signed front
door and the worker against the sandbox: the owner is who started the live or last run,
else the instance's `runctl:user` tag, else nobody (admins only); a run is live from the
moment its train job takes the lock; [Resume training] is the stopped run's owner's or an
admin's."""

from __future__ import annotations

import json
from datetime import timedelta

from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs.funnel import Job
from workers.jobs.train import TrainFlow
from workers.services import Services
from workers.slack.ids import ActionId
from workers.slack.messages.lifecycle import ready_blocks
from workers.state.runs import Checkpoint, Run, RunState, new_run

from .conftest import TOKEN
from .slack import click, command
from .test_lifecycle import SLOW, as_dict, dispatch, posted, train_on, wait_for_epoch

CHANNEL = "C0TRAIN"
ALICE, BOB, ADMIN, MALLORY = "U0ALICE", "U0BOB", "U0ADMIN", "U0MALLORY"


def slash(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str) -> str:
    """A signed slash command through the real Bolt app, then its job; returns the ack's text."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user))
    assert resp.status == 200
    worker.drain(timeout=120)
    return str(json.loads(resp.body).get("text", "")) if resp.body else ""


def told(slack: FakeSlack, user: str) -> str:
    return "\n".join(m.text for m in slack.ephemerals(user))


def tag_owner(svc: Services, iid: str, user: str) -> None:
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": user}])


def test_an_instance_without_runs_is_its_tag_owners_to_stop(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    tag_owner(svc, iid, ALICE)
    slash(svc, slack, worker, f"stop {iid}", BOB)
    assert svc.fleet.get(iid).state == "running"
    assert "You can't `stop`" in told(slack, BOB) and f"the owner (<@{ALICE}>)" in told(slack, BOB)
    slash(svc, slack, worker, f"stop {iid}", ALICE)  # the tag owner may
    assert svc.fleet.get(iid).state == "stopped"


def test_an_instance_nobody_owns_is_for_admins_only(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    running, stopped = fleet_seed.instances["cpu-box"], fleet_seed.instances["old-box"]
    slash(svc, slack, worker, f"stop {running}", BOB)
    slash(svc, slack, worker, f"start {stopped} --no-wait", BOB)
    assert svc.fleet.get(running).state == "running" and svc.fleet.get(stopped).state == "stopped"
    assert told(slack, BOB).count("the owner (it has none") == 2
    slash(svc, slack, worker, f"start {stopped} --no-wait", ADMIN)
    assert svc.fleet.get(stopped).state in ("pending", "running")


def test_the_last_run_makes_its_user_the_owner_over_the_tag(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["old-box"]  # stopped
    tag_owner(svc, iid, BOB)
    now = svc.clock()
    svc.runs.create(
        Run(
            run_id="r-own-last",
            instance_id=iid,
            user_id=ALICE,
            channel_id=CHANNEL,
            script="t.py",
            state=RunState.STOPPED,
            created_at=now - timedelta(hours=2),
            started_at=now - timedelta(hours=2),
            ended_at=now - timedelta(hours=1),
        )
    )
    # a refused run took no lock: it makes nobody the owner
    svc.runs.create(
        Run(
            run_id="r-own-refused",
            instance_id=iid,
            user_id="U0CARL",
            channel_id=CHANNEL,
            script="t.py",
            state=RunState.REFUSED,
            created_at=now,
        )
    )
    carl = slash(svc, slack, worker, f"start {iid} --no-wait", "U0CARL")  # the front door knows the runs
    bob = slash(svc, slack, worker, f"start {iid} --no-wait", BOB)
    assert svc.fleet.get(iid).state == "stopped"
    assert f"the owner (<@{ALICE}>)" in bob and "You can't `start`" in carl


def test_a_run_is_live_from_the_moment_its_train_job_takes_the_lock(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    alice = Actor(user_id=ALICE, channel_id=CHANNEL)
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py")
    job = Job(svc, alice, "/runctl train", instance_id=iid)
    job.run = svc.runs.create(new_run(svc, cmd, alice, "r-own-starting"))
    flow = TrainFlow(job, cmd)
    # The train job's own steps up to the lock; it has not launched anything yet.
    flow.run.state = RunState.STARTING
    flow.check_code()
    assert flow.claim() is None  # the train lock is ALICE's
    try:
        refused = slash(svc, slack, worker, f"stop {iid}", BOB)
        assert svc.fleet.get(iid).state == "running"
        assert f"the owner (<@{ALICE}>)" in refused
        run = svc.runs.get("r-own-starting")
        assert run is not None and run.state is RunState.STARTING
    finally:
        flow.release()


def test_resume_is_the_stopped_runs_owners_or_an_admins(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    now = svc.clock()
    stopped = svc.runs.create(
        Run(
            run_id="r-own-stopped",
            instance_id=iid,
            user_id=ALICE,
            channel_id=CHANNEL,
            script="train_with_checkpoints.py",
            state=RunState.STOPPED,
            ended_by="stop",
            created_at=now - timedelta(hours=1),
            started_at=now,
            ended_at=now,
            checkpoint=Checkpoint(name="ckpt-epoch-00003.json", size=10, modified_at=now, epoch=3),
        )
    )
    text, blocks = ready_blocks(f":white_check_mark: <@{ALICE}> started *gpu-box-1*.", stopped)
    svc.notifier.post(CHANNEL, text, blocks)
    report = posted(slack, "Resume it from there")

    dispatch(svc, slack, worker, click(as_dict(report), ActionId.RESUME_TRAINING, BOB))

    assert "You can't `resume`" in told(slack, BOB) and f"<@{ALICE}>" in told(slack, BOB)
    assert [r.run_id for r in svc.runs.history(iid)] == ["r-own-stopped"]  # nothing was resumed
    assert svc.redis.get("runctl:resume:r-own-stopped") is None  # and the button still works for her


# --- a refused train owns nothing and hides nothing (issue 23 J, issue 31 item 6) ---------------


def test_a_train_refused_in_pre_flight_does_not_make_its_requester_the_owner(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["old-box"]  # stopped; no run and no tag: nobody owns it
    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py", MALLORY)
    assert "is stopped" in told(slack, MALLORY)
    refused = slash(svc, slack, worker, f"start {iid} --no-wait", MALLORY)
    said = refused + told(slack, MALLORY)
    assert "You can't `start`" in said and "the owner (it has none" in said, said
    assert svc.fleet.get(iid).state == "stopped"


def test_a_refused_train_does_not_hide_the_last_real_runs_resume_offer(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    alices = train_on(iid, *SLOW, run_id="r-own-real")
    wait_for_epoch(sandbox, iid, alices, 1)
    slash(svc, slack, worker, f"stop {iid}", ALICE)  # checkpoint on SIGTERM, instance stopped
    assert svc.fleet.get(iid).state == "stopped"

    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py", MALLORY)  # refused: it is stopped
    assert "is stopped" in told(slack, MALLORY)

    slash(svc, slack, worker, f"status {iid}", ALICE)
    assert f"Last: `{alices}` stopped" in told(slack, ALICE), told(slack, ALICE)
    slash(svc, slack, worker, f"start {iid}", ALICE)
    report = posted(slack, "started *gpu-box-1")
    resume = [e for b in report.blocks if b.get("type") == "actions" for e in b["elements"]]
    assert [(e["action_id"], e["value"]) for e in resume] == [(ActionId.RESUME_TRAINING, alices)], report.blocks
