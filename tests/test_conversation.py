"""Issue 17, the conversation: through the signed front door and the worker against the
sandbox, a train that fails pre-flight is answered to the requester alone and posts nothing
in the channel; a passing run posts exactly one parent; quick commands answer in one message."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.services import Services
from workers.settings import Settings
from workers.state.locks import Holder, train_lock

from .conftest import TOKEN, sent_commands
from .slack import command

CHANNEL = "C0TRAIN"
ALICE, BOB = "U0ALICE", "U0BOB"


def slash(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str = ALICE) -> str:
    """A signed slash command through the real Bolt app, then its jobs; returns the ack's text."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user, channel=CHANNEL))
    assert resp.status == 200
    worker.drain(timeout=120)
    return str(json.loads(resp.body).get("text", "")) if resp.body else ""


def public(slack: FakeSlack) -> list[Message]:
    """What everyone in the channel sees: parents and thread replies, no ephemerals."""
    return [m for m in slack.messages(CHANNEL) if not m.ephemeral]


def private_to(slack: FakeSlack, user: str) -> str:
    return "\n".join(m.text for m in slack.ephemerals(user))


def assert_only_the_requester_hears(slack: FakeSlack, needle: str) -> None:
    assert public(slack) == [], [m.text for m in public(slack)]
    assert [c for c in slack.calls_to("chat.postMessage") if c.params.get("channel") == CHANNEL] == []
    assert needle in private_to(slack, ALICE)
    assert {m.user for m in slack.ephemerals()} == {ALICE}


@pytest.mark.parametrize(
    ("name", "script", "extra", "needle"),
    [
        ("gpu-box-1", "train_with_checkpoint.py", "", "does not exist"),
        ("gpu-box-1", "broken.py", "", "syntax error at line 3"),
        ("gpu-box-1", "train_with_checkpoints.py", "--ref mian", "`mian` is not a branch"),
        ("old-box", "train_with_checkpoints.py", "", "/runctl start"),
        ("not-managed", "train_with_checkpoints.py", "", "manages no instance"),
    ],
)
def test_a_train_that_fails_pre_flight_is_told_to_the_requester_alone(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    name: str,
    script: str,
    extra: str,
    needle: str,
) -> None:
    iid = fleet_seed.instances[name]
    ack = slash(svc, slack, worker, f"train {iid} {script} {extra} -- --epochs 1".replace("  ", " "))
    assert "Queued run" in ack
    assert_only_the_requester_hears(slack, needle)
    assert sent_commands(svc, iid) == []
    assert train_lock(svc.redis, iid).holder() is None


def test_an_instance_that_does_not_exist_is_told_privately(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "train i-0fedcba9876543210 train_with_checkpoints.py")
    assert_only_the_requester_hears(slack, "i-0fedcba9876543210")


def test_a_busy_instance_is_told_privately_with_the_holder(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    holder = Holder(run_id="r-bobs-run", user_id=BOB, script="train.py", since=datetime(2026, 1, 2, 3, 4, tzinfo=UTC))
    assert train_lock(svc.redis, iid).acquire(holder.token())
    # By id: the front door sees the lock and answers in the ack itself, with [Queue after it] (issue 27).
    ack = slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py")
    assert "is busy" in ack and f"<@{BOB}>" in ack and "r-bobs-run" in ack, ack
    assert public(slack) == [] and slack.ephemerals() == []
    # By name: only the worker can tell, and it refuses privately.
    slash(svc, slack, worker, "train gpu-box-2 train_with_checkpoints.py")
    assert_only_the_requester_hears(slack, "is busy")
    assert f"<@{BOB}>" in private_to(slack, ALICE) and "r-bobs-run" in private_to(slack, ALICE)
    assert sent_commands(svc, iid) == []


def test_a_policy_refusal_is_told_privately(
    svc: Services, settings: Settings, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[roles]\nml = ["U0BOB"]\n[commands]\ntrain = ["ml"]\n')
    svc.settings = settings.model_copy(update={"RUNCTL_POLICY_FILE": policy})
    iid = fleet_seed.instances["gpu-box-1"]
    ack = slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py")
    assert "can't" in ack or "can’t" in ack  # refused in the ack itself, nothing queued
    assert public(slack) == [] and sent_commands(svc, iid) == []


def test_a_passing_run_posts_exactly_one_parent(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    # by name (its Name tag), as a person would type it
    slash(
        svc,
        slack,
        worker,
        "train gpu-box-1 train_with_checkpoints.py -- --epochs 2 --steps-per-epoch 2 --step-seconds 0.05",
    )
    assert svc.runs.latest(iid) is not None and svc.runs.latest(iid).instance_id == iid  # type: ignore[union-attr]
    parents = [m for m in public(slack) if m.thread_ts is None]
    assert len(parents) == 1, [m.text for m in parents]
    final = json.dumps(parents[0].blocks)
    assert "Finished" in final and f"on gpu-box-1 (`{iid}`)" in final  # the name beside the id
    assert all(m.thread_ts == parents[0].ts for m in public(slack) if m is not parents[0])
    # the final parent: no live fields, absolute times, the checkpoint; the notes said once, in the thread
    assert "ETA" not in final and " ago" not in final and "elapsed" not in final
    assert "<!date^" in final and "took " in final and "ckpt-epoch-00002.json" in final
    assert "Added `--checkpoint-interval 1`" not in final  # the args still show it
    said = [m.text for m in slack.thread(CHANNEL, parents[0].ts) if "Added `--checkpoint-interval 1`" in m.text]
    assert len(said) == 1 and "Added" in said[0]
    updates = [c for c in slack.calls_to("chat.update") if c.params.get("ts") == parents[0].ts]
    assert updates and not any("Added `--checkpoint-interval" in json.dumps(c.params) for c in updates)


@pytest.mark.parametrize("text", ["status {iid}", "checkpoints {iid}", "resources", "audit 5"])
def test_a_quick_command_answers_in_one_message(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, text: str
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    user = "U0ADMIN" if text.startswith("audit") else ALICE
    ack = slash(svc, slack, worker, text.format(iid=iid), user=user)
    assert ack == ""  # no "queued; the answer follows" message before the answer
    answers = slack.ephemerals(user) + slack.responses() + [m for m in public(slack) if m.thread_ts is None]
    assert len(answers) == 1, [m.text for m in answers]


# --- instance names ---------------------------------------------------------------


def test_status_takes_an_instance_name_and_shows_it(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    slash(svc, slack, worker, "status gpu-box-1")
    assert f"gpu-box-1 ({iid})" in private_to(slack, ALICE)


def test_an_ambiguous_name_lists_the_candidates(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    twins = [fleet_seed.instances["gpu-box-2"], fleet_seed.instances["cpu-box"]]
    svc.fleet.ec2.create_tags(Resources=twins, Tags=[{"Key": "Name", "Value": "twin"}])
    slash(svc, slack, worker, "stop twin")
    told = private_to(slack, ALICE)
    assert "2 instances runctl manages are named `twin`" in told
    assert all(f"twin ({iid})" in told for iid in twins) and "instance id" in told
    assert public(slack) == [] and all(svc.fleet.get(i).state == "running" for i in twins)


def test_an_unknown_name_suggests_the_nearest(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "status gpu-box-9")
    told = private_to(slack, ALICE)
    assert "no instance named `gpu-box-9`" in told and "`gpu-box-1`" in told


# --- suggestions and wording --------------------------------------------------------


def test_a_missing_script_suggests_the_nearest_by_name_and_path(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "train gpu-box-1 train.py")
    told = private_to(slack, ALICE)
    assert "`train.py` does not exist" in told and "`train_torch.py`" in told and "Did you mean" in told
    assert "broken.py" not in told
    assert public(slack) == []


def test_starting_a_running_instance_says_so_once(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    tag = [{"Key": "runctl:user", "Value": ALICE}]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=tag)
    slash(svc, slack, worker, "start gpu-box-1")
    told = private_to(slack, ALICE) + "\n".join(m.text for m in public(slack))
    assert f"gpu-box-1 ({iid}) is already running." in told
    assert "nothing to start" not in told


# --- final messages ---------------------------------------------------------------


def test_a_final_parent_drops_the_eta_and_relative_times() -> None:
    from datetime import timedelta

    from workers.slack.messages.run import run_blocks
    from workers.state.runs import Checkpoint, Progress, Run, RunState

    start = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)
    run = Run(
        run_id="r-final",
        instance_id="i-0123456789abcdef0",
        user_id=ALICE,
        channel_id=CHANNEL,
        script="train.py",
        state=RunState.STOPPED,
        started_at=start,
        ended_at=start + timedelta(minutes=90),
        progress=Progress(epoch=3, total_epochs=10, metrics={"loss": 0.25}, eta_seconds=600),
        checkpoint=Checkpoint(name="ckpt-3.pt", size=2048, epoch=3, modified_at=start + timedelta(minutes=80)),
        notes=["Added `--checkpoint-interval 1`"],
        stopped_by=ALICE,
        ended_by="stop",
    )
    text = json.dumps([b.to_dict() for b in run_blocks(run, start + timedelta(hours=5))[1]])
    assert "ETA" not in text and " ago" not in text and "elapsed" not in text
    assert "loss 0.25" in text and "epoch 3/10" in text and "ckpt-3.pt" in text
    assert f"<!date^{int((start + timedelta(minutes=80)).timestamp())}^" in text  # when it was saved
    assert "took 1h 30m" in text and "checkpoint-interval" not in text
    assert f"stopped by <@{ALICE}>" in text and "Stopping" not in text
    live = run.model_copy(update={"state": RunState.RUNNING, "ended_at": None})
    live_text = json.dumps([b.to_dict() for b in run_blocks(live, start + timedelta(minutes=85))[1]])
    assert "ETA 10m" in live_text and "5m 00s ago" in live_text
