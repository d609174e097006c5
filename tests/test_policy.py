"""Who may do what: the default policy, a policy file, user groups, the front door,
button clicks by someone else, and a policy change between queueing and acting."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_mod
from rq import Queue
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers import audit, policy
from workers.commands import Actor, TrainCommand
from workers.errors import ConfigError, PermissionDenied
from workers.queueing import QUEUES
from workers.services import Services
from workers.settings import Settings
from workers.slack import usergroups
from workers.slack.ids import ActionId, BlockId
from workers.state.runs import Run, RunState, RunStore

from .conftest import TOKEN, sent_commands
from .slack import action, click, command

IID = "i-0123456789abcdef0"
ADMIN, ALICE, BOB = "U0ADMIN", "U0ALICE", "U0BOB"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    # Same-second rewrites must still look changed to the mtime cache.
    stamp = time.time_ns() + 1_000_000
    os.utime(path, ns=(stamp, stamp))
    return path


def refused(settings: Settings, user: str, action_name: str, owner: str | None = None) -> str:
    with pytest.raises(PermissionDenied) as info:
        policy.check(settings, user, action_name, owner)
    return info.value.as_text()


# --- the default policy ---------------------------------------------------------


@pytest.mark.parametrize("action_name", ["train", "status", "resources", "checkpoints"])
def test_default_everyone_may(settings: Settings, action_name: str) -> None:
    policy.check(settings, BOB, action_name)


@pytest.mark.parametrize("action_name", ["stop", "start"])
def test_default_owner_or_admin(settings: Settings, action_name: str) -> None:
    policy.check(settings, ALICE, action_name, owner_id=ALICE)
    policy.check(settings, ADMIN, action_name, owner_id=ALICE)
    text = refused(settings, BOB, action_name, owner=ALICE)
    assert "the owner (<@U0ALICE>) or role `admin`" in text
    assert "Admins: <@U0ADMIN>" in text
    # Nobody owns it (no run, no runctl:user tag): admins only, never "anyone".
    policy.check(settings, ADMIN, action_name, owner_id=None)
    assert "the owner (it has none" in refused(settings, BOB, action_name, owner=None)


@pytest.mark.parametrize("action_name", ["terminate", "force", "audit"])
def test_default_admin_only(settings: Settings, action_name: str) -> None:
    policy.check(settings, ADMIN, action_name)
    text = refused(settings, ALICE, action_name)
    assert f"You can't `{action_name}` here: it needs role `admin`." in text
    assert "Admins: <@U0ADMIN>." in text


def test_refusal_without_admins_says_how_to_get_one(settings: Settings) -> None:
    lonely = settings.model_copy(update={"RUNCTL_ADMINS": []})
    assert "nobody yet (set RUNCTL_ADMINS)" in refused(lonely, ALICE, "terminate")


# --- a policy file ----------------------------------------------------------------

TOML = """
admins = ["U0OPS"]
channels = ["C0TRAIN"]
scope = "team=ml"
[roles]
ml = ["U0ALICE"]
[commands]
train = ["ml", "admin"]
terminate = ["ml"]
"""


def test_policy_file_roles_commands_channels_and_scope(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"RUNCTL_POLICY_FILE": write(tmp_path / "policy.toml", TOML)})
    policy.check(s, ALICE, "train")
    policy.check(s, "U0OPS", "train")  # file admins add to RUNCTL_ADMINS
    policy.check(s, ADMIN, "train")
    text = refused(s, BOB, "train")
    assert "role `ml` or role `admin`" in text and "<@U0OPS>" in text and "policy.toml" in text
    policy.check(s, ALICE, "terminate")
    refused(s, ADMIN, "terminate")  # the file gave terminate to ml alone
    policy.check(s, BOB, "status")  # unlisted commands keep the default
    policy.check_channel(s, "C0TRAIN")
    with pytest.raises(PermissionDenied, match="does not take commands in this channel") as info:
        policy.check_channel(s, "C0RANDOM")
    assert "<#C0TRAIN>" in info.value.as_text()
    assert policy.scope(s) == ("team", "ml")


def test_yaml_and_a_change_takes_effect_on_the_next_check(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path / "policy.yaml", "roles:\n  ml: [U0BOB]\ncommands:\n  train: [ml]\n")
    s = settings.model_copy(update={"RUNCTL_POLICY_FILE": path})
    policy.check(s, BOB, "train")
    refused(s, ALICE, "train")
    write(path, "roles:\n  ml: [U0ALICE]\ncommands:\n  train: [ml]\n")
    policy.check(s, ALICE, "train")
    refused(s, BOB, "train")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[commands]\ntrain = ['wizards']\n", "commands.train names role 'wizards'"),
        ("[commands]\ntrian = ['admin']\n", "commands.trian"),
        ("[roles]\nml = ['alice']\n", "roles.ml"),
        ("admins = 'U0X'\n", "admins"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_invalid_policy_refuses_and_names_the_problem(
    settings: Settings, tmp_path: Path, text: str, names: str
) -> None:
    s = settings.model_copy(update={"RUNCTL_POLICY_FILE": write(tmp_path / "policy.toml", text)})
    with pytest.raises(ConfigError) as info:
        policy.check(s, ADMIN, "status")
    assert names in info.value.why and "refuses commands" in info.value.what


def test_missing_policy_file_refuses(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"RUNCTL_POLICY_FILE": tmp_path / "nope.toml"})
    with pytest.raises(ConfigError, match="cannot be read"):
        policy.check(s, ADMIN, "status")


# --- user groups through the Slack API ---------------------------------------------


@pytest.fixture
def groups(slack: FakeSlack) -> Iterator[None]:
    """User group S0MLTEAM = [Alice] on the fake Slack; S0GONE does not exist."""
    slack.reset()
    slack.add_usergroup("S0MLTEAM", [ALICE])
    usergroups.forget()
    yield
    usergroups.forget()


def test_user_group_roles_are_resolved_and_cached(
    settings: Settings, tmp_path: Path, slack: FakeSlack, groups: None
) -> None:
    text = "admins = ['S0GONE']\n[roles]\nml = ['S0MLTEAM']\n[commands]\ntrain = ['ml']\n"
    s = settings.model_copy(update={"RUNCTL_POLICY_FILE": write(tmp_path / "p.toml", text)})
    policy.check(s, ALICE, "train")
    policy.check(s, ALICE, "train")
    refused(s, BOB, "train")
    assert len(slack.calls_to("usergroups.users.list")) == 1  # cached
    message = refused(s, BOB, "terminate")
    assert "<!subteam^S0GONE>" in message and "S0GONE (no_such_subteam)" in message


# --- the front door (Bolt app, before anything is queued) ---------------------------


@pytest.fixture
def app(settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack) -> App:
    return build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)


def queued(redis: redis_mod.Redis, expect: int = 0) -> list[Any]:
    """The queued jobs, after waiting (briefly) for `expect` of them: Bolt acks before the listener runs."""
    queues = [Queue(name, connection=redis) for name in QUEUES]  # quick and long jobs
    deadline = time.monotonic() + 5
    while sum(q.count for q in queues) < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    jobs = sorted((job for q in queues for job in q.jobs), key=lambda j: j.enqueued_at or j.created_at)
    return [(job.func_name, job.args[1]["user_id"]) for job in jobs]


def reply_text(response: Any) -> str:
    return str(json.loads(response.body)["text"]) if response.body else ""


@pytest.mark.parametrize(
    ("text", "allowed", "denied"),
    [
        (f"train {IID} train.py", BOB, None),
        (f"train {IID} train.py --force", ADMIN, BOB),
        (f"status {IID}", BOB, None),
        ("resources", BOB, None),
        (f"checkpoints {IID}", BOB, None),
        (f"stop {IID}", ALICE, BOB),  # Alice owns the live run
        (f"stop {IID} --force", ADMIN, ALICE),
        (f"start {IID}", ALICE, BOB),  # Alice owned the last run
        (f"terminate {IID}", ADMIN, ALICE),
        ("audit", ADMIN, BOB),
    ],
)
def test_each_command_at_the_front_door(
    app: App, real_redis: redis_mod.Redis, text: str, allowed: str, denied: str | None
) -> None:
    runs = RunStore(real_redis)
    runs.save(
        runs.create(
            Run(
                run_id="r-alice",
                instance_id=IID,
                user_id=ALICE,
                channel_id="C0TRAIN",
                script="t.py",
                state=RunState.RUNNING,
            )
        )
    )
    ok = app.dispatch(command(text, user=allowed))
    assert ok.status == 200 and ("queued" in reply_text(ok).lower() or not ok.body)  # quick ones ack empty
    assert [user for _, user in queued(real_redis, 1)] == [allowed]
    if denied is None:
        return
    no = app.dispatch(command(text, user=denied))
    assert no.status == 200 and json.loads(no.body)["response_type"] == "ephemeral"
    assert "You can't" in reply_text(no) and "<@U0ADMIN>" in reply_text(no)
    assert [user for _, user in queued(real_redis)] == [allowed]  # nothing more was queued
    decisions = [(r.user, r.decision) for r in audit.newest(real_redis, 10)]
    assert decisions == [(denied, "refused"), (allowed, "allowed")]


def test_commands_outside_the_policy_channels_are_refused(
    app: App, settings: Settings, real_redis: redis_mod.Redis, tmp_path: Path
) -> None:
    write(tmp_path / "p.toml", "channels = ['C0OPS']\n")
    settings.RUNCTL_POLICY_FILE = tmp_path / "p.toml"  # the app holds this object
    no = app.dispatch(command(f"status {IID}", user=ADMIN, channel="C0TRAIN"))
    assert "does not take commands in this channel" in reply_text(no) and "<#C0OPS>" in reply_text(no)
    assert "Usage" not in reply_text(app.dispatch(command("help", user=ADMIN, channel="C0TRAIN")))
    assert queued(real_redis) == []


def test_rate_limit_per_user(app: App, settings: Settings, real_redis: redis_mod.Redis) -> None:
    settings.RUNCTL_RATE_PER_MINUTE = 3
    texts = [reply_text(app.dispatch(command(f"status {IID}", user=BOB))) for _ in range(4)]
    assert texts[:3] == ["", "", ""]  # accepted: status answers in one message, later
    assert "the limit is 3" in texts[3] and "Try again in" in texts[3]
    assert app.dispatch(command(f"status {IID}", user=ALICE)).body == ""  # per user
    assert len(queued(real_redis, 4)) == 4


def test_a_replayed_command_is_queued_once(app: App, real_redis: redis_mod.Redis) -> None:
    first = command(f"status {IID}", user=BOB, trigger_id="trig.same")
    again = command(f"status {IID}", user=BOB, trigger_id="trig.same")
    again.headers["x-slack-retry-num"] = ["1"]
    assert app.dispatch(first).status == 200
    assert app.dispatch(again).status == 200
    assert len(queued(real_redis, 1)) == 1


# --- button clicks: the clicking user is checked -----------------------------------------


def message(action_id: str, value: str = "nonce") -> dict[str, Any]:
    return {
        "ts": "1700000000.000100",
        "text": "confirm",
        "blocks": [
            {
                "type": "actions",
                "block_id": BlockId.TERMINATE_ACTIONS,
                "elements": [
                    {
                        "type": "button",
                        "action_id": action_id,
                        "text": {"type": "plain_text", "text": "Go"},
                        "value": value,
                    }
                ],
            }
        ],
    }


def test_a_click_by_someone_else_is_refused_privately(app: App, slack: FakeSlack, real_redis: redis_mod.Redis) -> None:
    slack.reset()
    app.dispatch(action(click(message(ActionId.TERMINATE_CONFIRM), ActionId.TERMINATE_CONFIRM, user=BOB)))
    (note,) = slack.ephemerals(BOB)
    assert "You can't `terminate`" in note.text and "<@U0ADMIN>" in note.text
    (entry,) = audit.newest(real_redis, 5)
    assert (entry.user, entry.decision, entry.source, entry.text) == (
        BOB,
        "refused",
        "click",
        "click terminate_confirm",
    )


def test_a_click_is_checked_against_the_current_policy(
    app: App, settings: Settings, slack: FakeSlack, real_redis: redis_mod.Redis, tmp_path: Path
) -> None:
    slack.reset()
    stop_button = message(ActionId.WARN_STOP_NOW)
    app.dispatch(action(click(stop_button, ActionId.WARN_STOP_NOW, user=BOB)))
    assert slack.ephemerals(BOB) == []  # the default lets the gate pass; the handler checks the owner
    settings.RUNCTL_POLICY_FILE = write(tmp_path / "p.toml", "[commands]\nstop = ['admin']\n")
    app.dispatch(action(click(stop_button, ActionId.WARN_STOP_NOW, user=BOB)))
    (note,) = slack.ephemerals(BOB)
    assert "You can't `stop`" in note.text
    assert [e.decision for e in audit.newest(real_redis, 5)] == ["refused", "allowed"]


# --- the worker checks again, just before acting -------------------------------------------


def test_a_policy_change_between_queueing_and_acting_refuses_in_the_worker(
    app: App, svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, tmp_path: Path
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    path = write(tmp_path / "p.toml", "[roles]\nml = ['U0ALICE']\n[commands]\ntrain = ['ml']\n")
    svc.settings.RUNCTL_POLICY_FILE = path  # the app and the worker share this Settings object
    assert "Queued run" in reply_text(app.dispatch(command(f"train {iid} train_with_checkpoints.py", user=ALICE)))
    write(path, "[roles]\nml = ['U0BOB']\n[commands]\ntrain = ['ml']\n")
    worker.drain()
    (note,) = slack.ephemerals(ALICE)
    assert "You can't `train`" in note.text and "role `ml`" in note.text
    assert sent_commands(svc, iid) == []
    assert slack.messages("C0TRAIN") == []  # nothing was announced
    entry = audit.newest(svc.redis, 1)[0]
    assert (entry.user, entry.decision, entry.source, entry.instance) == (ALICE, "refused", "worker", iid)


def test_force_is_rechecked_in_the_worker(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    from workers.jobs.train import train

    iid = fleet_seed.instances["gpu-box-1"]
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", force=True)
    who = Actor(user_id=ALICE, channel_id="C0TRAIN", text=f"train {iid} train_with_checkpoints.py --force")
    assert train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), "r-force") == "refused"
    assert "You can't `force`" in slack.ephemerals(ALICE)[0].text
    assert sent_commands(svc, iid) == []


@pytest.mark.parametrize(("verb", "button"), [("snooze", ActionId.WARN_SNOOZE), ("keep", ActionId.WARN_KEEP)])
def test_a_policy_file_can_name_the_button_verbs(
    app: App, settings: Settings, slack: FakeSlack, tmp_path: Path, verb: str, button: ActionId
) -> None:
    """`resume`, `snooze` and `keep` are actions a team may give to a role like any command."""
    slack.reset()
    settings.RUNCTL_POLICY_FILE = write(tmp_path / "p.toml", f"[commands]\n{verb} = ['admin']\nresume = ['admin']\n")
    app.dispatch(action(click(message(button), button, user=BOB)))
    (note,) = slack.ephemerals(BOB)
    assert f"You can't `{verb}`" in note.text and "refuses commands" not in note.text
