"""Slack's escaping, both ways: command text arrives HTML-escaped with mentions as markup
(`should_escape: true`); what the bot echoes is escaped again so it pings nobody."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis as redis_mod
from rq import Queue
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from tests.conftest import TOKEN
from tests.slack import command
from workers.commands import TrainCommand
from workers.queueing import LONG_QUEUE, QUEUE
from workers.settings import Settings
from workers.slack.messages.run import run_blocks
from workers.state.runs import Run

IID = "i-0123456789abcdef0"
# What Slack sends when someone types:
#   train i-… train.py -- --tag a&b --note "<x> & y" --who @bob --all @channel `tick`
SENT = (
    f'train {IID} train.py -- --tag a&amp;b --note "&lt;x&gt; &amp; y" --who <@U0BOB|bob> '
    "--all <!channel> --team <!subteam^S0ML|@ml> --in <#C0GEN|general> `tick`"
)
TYPED = (
    "--tag",
    "a&b",
    "--note",
    "<x> & y",
    "--who",
    "@bob",
    "--all",
    "@channel",
    "--team",
    "@ml",
    "--in",
    "#general",
    "`tick`",
)


def test_escaped_text_and_mentions_reach_the_script_as_typed_and_echo_back_literally(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)

    ack = json.loads(app.dispatch(command(SENT)).body)["text"]

    (job,) = Queue(LONG_QUEUE, connection=real_redis).jobs  # a train: the long queue
    cmd = TrainCommand.model_validate(job.args[0])
    assert cmd.args == TYPED
    run = Run(
        run_id="r-1",
        instance_id=IID,
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script=cmd.script,
        args=cmd.args,
        ref="main",
        created_at=datetime.now(UTC),
    )
    text, blocks = run_blocks(run)
    shown = text + json.dumps([b.to_dict() for b in blocks])
    assert "a&amp;b" in shown and "&lt;x&gt; &amp; y" in shown and "@bob" in shown
    for live in ("<!channel>", "<@U0BOB", "<!subteam", "<#C0GEN"):
        assert live not in shown and live not in ack
    assert "`tick`" not in shown  # a backtick in user text cannot close the code span


def test_a_mention_still_names_the_user_for_user_flags(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)

    app.dispatch(command("resources --user <@U0BOB|bob>"))

    (job,) = Queue(QUEUE, connection=real_redis).jobs
    assert job.args[0]["user"] == "U0BOB"


def test_usage_errors_echo_user_text_without_pinging(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)

    unknown = json.loads(app.dispatch(command("<!channel> now")).body)["text"]
    bad_id = json.loads(app.dispatch(command("status <!here>")).body)["text"]
    no_sep = json.loads(app.dispatch(command(f"train {IID} train.py --tag a&amp;b")).body)["text"]

    assert "<!channel>" not in unknown and "@channel" in unknown
    assert "<!here>" not in bad_id and "@here" in bad_id
    # The corrected command to copy carries what the person typed, escaped for display.
    assert "train.py -- --tag 'a&amp;b'" in no_sep
