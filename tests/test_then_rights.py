"""`train --then stop|terminate` needs the right to stop or terminate the instance (issue 23,
finding C): when it is sent (privately refused, with the fix), and again when the run ends
(refused then, the instance keeps running and the run's thread says who may stop it).
Signed commands through the real Bolt app, real RQ, runs executed by the sandbox's SSM."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.services import Services
from workers.state.runs import RunState

from .conftest import TOKEN
from .slack import command

CHANNEL = "C0TRAIN"
ALICE, BOB, MALLORY = "U0ALICE", "U0BOB", "U0MALLORY"
SCRIPT = "train_with_checkpoints.py"
FAST = "--epochs 1 --steps-per-epoch 1 --step-seconds 0"


def send(
    svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str, *, run: bool = True
) -> dict[str, Any]:
    """A signed slash command through the real Bolt app; its job queued (and, with `run`, everything
    it leads to run); returns the ack's body."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user, channel=CHANNEL))
    assert resp.status == 200
    body: dict[str, Any] = json.loads(resp.body) if resp.body else {}
    if body.get("response_type") != "ephemeral" or "Queued" in str(body.get("text")):
        deadline = time.monotonic() + 3  # Bolt queues the job after the ack, in its own thread
        while not worker.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
    if run:
        worker.drain(timeout=120)
    return body


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    stamp = time.time_ns() + 1_000_000  # a same-second rewrite still looks changed to the policy's cache
    os.utime(path, ns=(stamp, stamp))
    return path


def test_then_terminate_and_then_stop_are_refused_privately_to_who_may_not(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    send(svc, slack, worker, f"train {iid} {SCRIPT} -- {FAST}", BOB)  # Bob's run: his checkpoints, his instance
    bobs = svc.runs.latest(iid)
    assert bobs is not None and bobs.user_id == BOB and bobs.state is RunState.SUCCEEDED

    for then, needs in (("terminate", "needs role `admin`"), ("stop", f"needs the owner (<@{BOB}>) or role `admin`")):
        body = send(svc, slack, worker, f"train {iid} {SCRIPT} --then {then} -- {FAST}", MALLORY)
        text = str(body.get("text"))
        assert body.get("response_type") == "ephemeral", body
        assert f"You can't train on `{iid}` with `--then {then}`" in text and needs in text, text
        assert "Fix: Send the command again with `--then keep`" in text, text

    assert svc.fleet.get(iid).state == "running"  # neither terminated nor stopped
    latest = svc.runs.latest(iid)
    assert latest is not None and latest.run_id == bobs.run_id  # Mallory's never ran
    assert not [m for m in slack.messages(CHANNEL) if MALLORY in m.text]  # nothing in public
    refusals = [e for e in audit.newest(svc.redis, 10) if e.user == MALLORY]
    assert [e.decision for e in refusals] == ["refused", "refused"]


def test_the_worker_refuses_it_when_only_the_owner_tag_tells(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": BOB}])  # no run: the tag tells
    body = send(svc, slack, worker, f"train {iid} {SCRIPT} --then stop -- {FAST}", MALLORY)
    assert "Queued run" in str(body.get("text")), body  # the front door reads no EC2 tags
    told = "\n".join(m.text for m in slack.ephemerals(MALLORY))
    assert f"You can't train on `{iid}` with `--then stop`" in told and f"the owner (<@{BOB}>)" in told, told
    assert "`--then keep`" in told
    assert svc.fleet.get(iid).state == "running" and svc.runs.latest(iid) is None
    assert not [m for m in slack.messages(CHANNEL) if MALLORY in m.text]


def test_a_default_then_from_runctl_then_needs_the_right_too(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    svc.settings.RUNCTL_THEN = "terminate"  # the app and the worker share this Settings object
    body = send(svc, slack, worker, f"train {iid} {SCRIPT} -- {FAST}", MALLORY)
    text = str(body.get("text"))
    assert body.get("response_type") == "ephemeral" and "(RUNCTL_THEN is `terminate` here)" in text, text
    assert svc.fleet.get(iid).state == "running" and svc.runs.latest(iid) is None

    send(svc, slack, worker, f"train {iid} {SCRIPT} --then keep -- {FAST}", MALLORY)  # the fix works
    run = svc.runs.latest(iid)
    assert run is not None and run.user_id == MALLORY and run.state is RunState.SUCCEEDED and run.then == "keep"
    assert svc.fleet.get(iid).state == "running"


@pytest.mark.parametrize(
    ("then", "granted", "revoked", "may_stop"),
    [
        (
            "terminate",
            "[roles]\nml = ['U0ALICE']\n[commands]\nterminate = ['ml', 'admin']\n",
            "[roles]\nml = ['U0BOB']\n[commands]\nterminate = ['ml', 'admin']\n",
            f"Who may stop it: the owner (<@{ALICE}>) or role `admin` (admins: <@U0ADMIN>)",
        ),
        (
            "stop",
            "[commands]\nstop = ['owner', 'admin']\n",
            "[commands]\nstop = ['admin']\n",
            "Who may stop it: role `admin` (admins: <@U0ADMIN>)",
        ),
    ],
)
def test_a_right_revoked_before_the_run_ends_leaves_the_instance_running(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    tmp_path: Path,
    then: str,
    granted: str,
    revoked: str,
    may_stop: str,
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.settings.RUNCTL_POLICY_FILE = write(tmp_path / "policy.toml", granted)
    body = send(svc, slack, worker, f"train {iid} {SCRIPT} --then {then} -- {FAST}", ALICE, run=False)
    assert "Queued run" in str(body.get("text")), body
    worker.work()  # the train job alone: the run starts; the monitor's polls are still scheduled
    run = svc.runs.latest(iid)
    assert run is not None and run.started_at is not None and run.then == then

    write(tmp_path / "policy.toml", revoked)  # an admin takes the right away while it runs
    worker.drain(timeout=120)  # the monitor sees the end; `--then` fires

    assert svc.fleet.get(iid).state == "running"
    ended = svc.runs.get(run.run_id)
    assert ended is not None and ended.state is RunState.SUCCEEDED
    said = [m.text for m in slack.thread(CHANNEL, run.message_ts or "")]
    left = [t for t in said if f"`--then {then}`: *gpu-box-1" in t and "was left running" in t]
    assert len(left) == 1, said
    assert f"<@{ALICE}>" in left[0] and f"You can't `{then}` here" in left[0], left[0]
    assert may_stop in left[0] and f"`/runctl stop {iid}`" in left[0], left[0]
    entry = next(e for e in audit.newest(svc.redis, 10) if e.run_id == run.run_id and e.decision != "allowed")
    assert (entry.user, entry.decision, entry.instance) == (ALICE, "refused", iid)
