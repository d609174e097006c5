"""The command grammar: table-driven cases and a property over any text."""

from __future__ import annotations

import json

import pytest
import redis as redis_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk import WebClient

from bot.app import build_app
from bot.grammar import SPECS, parse
from runctl_sandbox.fake_slack import FakeSlack
from workers import commands as c
from workers.errors import UsageError
from workers.settings import Settings

from . import slack as s
from .conftest import TOKEN

IID = "i-0123456789abcdef0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", c.HelpCommand()),
        ("help train", c.HelpCommand(topic="train")),
        (f"status {IID}", c.StatusCommand(instance_id=IID)),
        ("status i-0123abcd", c.StatusCommand(instance_id="i-0123abcd")),
        (f"train {IID} train.py", c.TrainCommand(instance_id=IID, script="train.py")),
        (f"train {IID} ./src/train.py", c.TrainCommand(instance_id=IID, script="src/train.py")),
        (
            f"train {IID} t.py --ref feature/x --no-wait --force --checkpoint-interval 5 -- --epochs 10 'a b'",
            c.TrainCommand(
                instance_id=IID,
                script="t.py",
                ref="feature/x",
                wait=False,
                force=True,
                checkpoint_interval=5,
                args=("--epochs", "10", "a b"),
            ),
        ),
        (f"train {IID} t.py --sync-code=false", c.TrainCommand(instance_id=IID, script="t.py", sync_code=False)),
        (f"train {IID} t.py --no-sync-code", c.TrainCommand(instance_id=IID, script="t.py", sync_code=False)),
        (f"train {IID} t.py --sync-code", c.TrainCommand(instance_id=IID, script="t.py", sync_code=True)),
        (f"train {IID} t.py -- --lr -1e-3", c.TrainCommand(instance_id=IID, script="t.py", args=("--lr", "-1e-3"))),
        (f"train {IID} t.py “--” x", c.TrainCommand(instance_id=IID, script="t.py", args=("x",))),
        (f"stop {IID} --grace 30", c.StopCommand(instance_id=IID, grace=30)),
        (f"start {IID} --no-wait", c.StartCommand(instance_id=IID, wait=False)),
        (f"terminate {IID}", c.TerminateCommand(instance_id=IID)),
        (
            "resources --all --sort uptime --user <@U012AB|ann>",
            c.ResourcesCommand(all=True, sort="uptime", user="U012AB"),
        ),
        ("resources --user @alice", c.ResourcesCommand(user="@alice")),
        ("resources --user @alice.smith-2", c.ResourcesCommand(user="@alice.smith-2")),
        ("audit --user '@Alice Smith'", c.AuditCommand(user="@Alice Smith")),
        ("audit --user @José", c.AuditCommand(user="@José")),
        (f"checkpoints {IID} --run r1", c.CheckpointsCommand(instance_id=IID, run_id="r1")),
        (f"audit 5 --instance {IID}", c.AuditCommand(count=5, instance_id=IID)),
        ("TRAIN i-0123abcd x.py", c.TrainCommand(instance_id="i-0123abcd", script="x.py")),
    ],
)
def test_parses(text: str, expected: c.Command) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message", "usage_starts"),
    [
        ("frobnicate", "Unknown command `frobnicate`", "/runctl train"),
        ("status i-xyz", "not an instance id", "/runctl status <instance-id>"),
        ("status i-0123abc", "not an instance id", "/runctl status"),
        ("status I-0123ABCD", "not an instance id", "/runctl status"),
        ("status", "Missing <instance-id>", "/runctl status"),
        (f"status {IID} extra", "Unexpected `extra`", "/runctl status"),
        (f"train {IID}", "Missing <script>", "/runctl train"),
        (f"train {IID} t.py --bogus-flag-before", "no `--` before it", "/runctl train"),
        (f"train --epochs 3 {IID} t.py", "Unknown option `--epochs`", "/runctl train"),
        (f"train {IID} t.py --checkpoint-interval x", "whole number", "/runctl train"),
        (f"train {IID} t.py --checkpoint-interval 0", "Bad value for `--checkpoint-interval`", "/runctl train"),
        (f"train {IID} t.py --sync-code=maybe", "true or false", "/runctl train"),
        (f"train {IID} t.py --ref", "needs a value", "/runctl train"),
        (f"train {IID} t.py --ref -x", "not a valid git ref", "/runctl train"),
        (f"train {IID} t.py --ref a..b", "not a valid git ref", "/runctl train"),
        (f"train {IID} /etc/passwd.py", "is absolute", "/runctl train"),
        (f"train {IID} ../up.py", "leaves the repository", "/runctl train"),
        (f"train {IID} a/../../up.py", "leaves the repository", "/runctl train"),
        (f"train {IID} run.sh", "not a Python script", "/runctl train"),
        (f"terminate {IID} --force", "always asks for confirmation", "/runctl terminate"),
        (f"stop {IID} -- x", "takes no script arguments", "/runctl stop"),
        ("resources --sort price", "must be one of cost, uptime, type", "/runctl resources"),
        ("resources --user bob", "Slack mention", "/runctl resources"),
        ("help nothing", "No help for `nothing`", "/runctl help"),
    ],
)
def test_usage_errors_quote_the_usage_line(text: str, message: str, usage_starts: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert message in err.value.what
    assert err.value.usage.startswith(usage_starts)
    assert "Usage: `/runctl" in err.value.as_text()


def test_missing_separator_shows_the_corrected_command() -> None:
    with pytest.raises(UsageError) as err:
        parse(f"train {IID} train.py --ref dev --epochs 10 --name 'my run'")
    assert err.value.suggestion == f"/runctl train {IID} train.py --ref dev -- --epochs 10 --name 'my run'"
    assert parse(err.value.suggestion.removeprefix("/runctl ")) == c.TrainCommand(
        instance_id=IID, script="train.py", ref="dev", args=("--epochs", "10", "--name", "my run")
    )


def test_bare_word_after_script_also_needs_separator() -> None:
    with pytest.raises(UsageError) as err:
        parse(f"train {IID} train.py data/")
    assert err.value.suggestion == f"/runctl train {IID} train.py -- data/"


@pytest.mark.parametrize(
    ("text", "what", "suggestion"),
    [
        (f"trian {IID} t.py", "Did you mean `train`?", f"/runctl train {IID} t.py"),
        ("stauts i-0123abcd", "Did you mean `status`?", "/runctl status i-0123abcd"),
        ("frobnicate", "Unknown command `frobnicate`.", "/runctl help"),
        ("help trian", "Did you mean `train`?", "/runctl help train"),
        (
            f"train {IID} t.py --chekpoint-interval 5",
            "Did you mean `--checkpoint-interval`? If `--chekpoint-interval` is for your script, put `--` "
            f"before it: `/runctl train {IID} t.py -- --chekpoint-interval 5`.",
            f"/runctl train {IID} t.py --checkpoint-interval 5",
        ),
        (
            f"train {IID} --chekpoint-interval=5 t.py",
            "Did you mean `--checkpoint-interval`?",
            f"/runctl train {IID} --checkpoint-interval=5 t.py",
        ),
        (f"train {IID} t.py -force", "Did you mean `--force`?", f"/runctl train {IID} t.py --force"),
        (f"stop {IID} --grce 30", "Did you mean `--grace`?", f"/runctl stop {IID} --grace 30"),
        ("resources --sotr uptime", "Did you mean `--sort`?", "/runctl resources --sort uptime"),
        (f"train {IID} t.py --epochs 3", "no `--` before it", f"/runctl train {IID} t.py -- --epochs 3"),
    ],
)
def test_unknown_commands_and_options_suggest_the_nearest(text: str, what: str, suggestion: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert what in err.value.what
    assert err.value.suggestion == suggestion


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        (f"train {IID} t.py \u2014 \u2014epochs 2", f"/runctl train {IID} t.py -- --epochs 2"),
        (f"train {IID} t.py \u2014epochs 2", f"/runctl train {IID} t.py -- --epochs 2"),
        (f"train {IID} t.py \u2013-epochs 2", f"/runctl train {IID} t.py -- --epochs 2"),
        (f"train {IID} t.py -- \u2014epochs 2 --lr 0.1", f"/runctl train {IID} t.py -- --epochs 2 --lr 0.1"),
        (f"train {IID} t.py \u2014no-wait \u2014 \u2013lr 1", f"/runctl train {IID} t.py --no-wait -- --lr 1"),
        (f"stop {IID} \u2014grace 30", f"/runctl stop {IID} --grace 30"),
    ],
)
def test_long_dashes_are_read_as_the_double_dash_they_replaced(text: str, suggestion: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert "long dash" in err.value.what
    assert err.value.suggestion == suggestion
    assert "\u2014" not in err.value.suggestion and "\u2013" not in err.value.suggestion
    parse(suggestion.removeprefix("/runctl "))  # the fix offered is a command that parses


def test_long_dash_with_another_mistake_says_both() -> None:
    with pytest.raises(UsageError) as err:
        parse(f"stop {IID} \u2014bogus")
    assert "long dash" in err.value.what and "Unknown option `--bogus`" in err.value.what


@pytest.mark.parametrize(
    "text",
    [f"train {IID} t.py -- 'a\nb'", f"train {IID} t.py -- 'a\x00b'", f"train {IID} t.py -- $'\\t'x\x1b"],
)
def test_control_characters_inside_tokens_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="control character"):
        parse(text)


def test_limits() -> None:
    with pytest.raises(UsageError, match="limit is 4000"):
        parse("help " + "x" * 5000)
    with pytest.raises(UsageError, match="Too many arguments"):
        parse(f"train {IID} t.py -- " + " ".join(["a"] * 150))
    with pytest.raises(UsageError, match="characters long"):
        parse(f"train {IID} t.py -- " + "a" * 1500)
    with pytest.raises(UsageError, match="check your quotes"):
        parse(f"train {IID} t.py -- 'open")


@pytest.mark.parametrize("name", [name for name, spec in SPECS.items() if spec.flags])
def test_help_command_explains_every_flag_in_one_line(
    name: str, settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = build_app(settings, fake_redis, client=WebClient(token=TOKEN, base_url=slack.base_url))
    resp = app.dispatch(s.command(f"help {name}"))
    body = json.loads(resp.body)
    assert body["response_type"] == "ephemeral"
    lines = body["text"].splitlines()
    for flag in SPECS[name].flags:
        usage = f"--{flag.name}" + (f" {flag.metavar}" if flag.kind not in ("switch", "bool") else "")
        mine = [line for line in lines if line.startswith(f"• `{usage}`: ")]
        assert len(mine) == 1, (usage, body["text"])
        assert len(mine[0]) > len(f"• `{usage}`: ") + 10


def test_a_mistyped_command_is_answered_privately_with_the_fix(
    settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = build_app(settings, fake_redis, client=WebClient(token=TOKEN, base_url=slack.base_url))
    before = len(slack.calls_to("chat.postMessage")), len(slack.calls_to("chat.postEphemeral"))
    body = json.loads(app.dispatch(s.command(f"trian {IID} train.py")).body)
    assert body["response_type"] == "ephemeral"
    assert f"`/runctl train {IID} train.py`" in body["text"]
    assert (len(slack.calls_to("chat.postMessage")), len(slack.calls_to("chat.postEphemeral"))) == before


words = st.sampled_from(
    [
        "train",
        "status",
        "stop",
        "start",
        "terminate",
        "resources",
        "checkpoints",
        "audit",
        "help",
        IID,
        "t.py",
        "--",
        "--ref",
        "--force",
        "--no-wait",
        "--grace",
        "--sort",
        "--user",
        "--run",
        "'",
        '"',
        "=",
        "5",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.one_of(words, st.text(max_size=12)), max_size=12).map(" ".join)))
def test_any_text_gives_a_model_or_a_usage_error(text: str) -> None:
    try:
        result = parse(text)
    except UsageError as exc:
        assert exc.what
        return
    assert isinstance(result, c.Command)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("status gpu-box-1", c.StatusCommand(instance_id="gpu-box-1")),
        ("stop gpu-box-1 --grace 30", c.StopCommand(instance_id="gpu-box-1", grace=30)),
        (
            "train gpu-box-1 train.py -- --epochs 2",
            c.TrainCommand(instance_id="gpu-box-1", script="train.py", args=("--epochs", "2")),
        ),
        ("audit --instance my.box_2", c.AuditCommand(instance_id="my.box_2")),
    ],
)
def test_an_instance_name_stands_wherever_an_id_does(text: str, expected: c.Command) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["status i-xyz", "status I-0123ABCD", "status -box", "status gpu;box", "status @box"])
def test_a_mistyped_id_is_not_taken_for_a_name(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert "not an instance id" in err.value.what or "Unknown option" in err.value.what
