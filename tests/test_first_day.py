"""Issue 31, a newcomer's first day: what read wrong, each through the real entry points
(signed commands and clicks to the Bolt app, jobs run by the worker against the sandbox)."""

from __future__ import annotations

import json
from typing import Any

import redis as redis_mod
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from tests.conftest import TOKEN
from tests.slack import command
from workers.settings import Settings

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
