"""Slash commands through Bolt's dispatch, with properly signed requests."""

from __future__ import annotations

import json
import time

import redis as redis_mod
from rq import Queue
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from workers.queueing import LONG_QUEUE
from workers.settings import Settings

from . import slack as s
from .conftest import TOKEN
from .queues import queued

IID = "i-0123456789abcdef0"


def make_app(settings: Settings, redis: redis_mod.Redis, slack: FakeSlack) -> App:
    return build_app(settings, redis, client=WebClient(token=TOKEN, base_url=slack.base_url))


def body_of(resp: object) -> dict[str, object]:
    return json.loads(resp.body) if resp.body else {}  # type: ignore[attr-defined]


def test_train_is_acked_fast_and_queued(settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack) -> None:
    app = make_app(settings, fake_redis, slack)
    started = time.perf_counter()
    resp = app.dispatch(s.command(f"train {IID} train.py -- --epochs 3"))
    elapsed = time.perf_counter() - started
    assert resp.status == 200
    text = str(body_of(resp)["text"])
    assert "Queued run `r" in text and IID in text and "thread" in text
    assert body_of(resp)["response_type"] == "ephemeral"
    assert elapsed < 3.0  # Slack's own hard limit; the benchmark measures the real figure
    queue = Queue(LONG_QUEUE, connection=fake_redis)  # a train may build an environment: the long queue
    deadline = time.monotonic() + 5
    while queue.count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    job = queue.jobs[0]
    assert job.func_name == "workers.jobs.train.train"
    assert job.args[0]["args"] == ["--epochs", "3"] and job.args[1]["user_id"] == "U0ALICE"


def test_usage_error_is_ephemeral_and_queues_nothing(
    settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = make_app(settings, fake_redis, slack)
    resp = app.dispatch(s.command(f"train {IID} train.py --epochs 3"))
    assert resp.status == 200
    text = str(body_of(resp)["text"])
    assert f"/runctl train {IID} train.py -- --epochs 3" in text
    time.sleep(0.2)
    assert queued(fake_redis) == []


def test_help_is_answered_in_the_ack(settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack) -> None:
    app = make_app(settings, fake_redis, slack)
    resp = app.dispatch(s.command("help"))
    text = str(body_of(resp)["text"])
    for name in ("train", "status", "stop", "start", "terminate", "resources", "checkpoints"):
        assert f"/runctl {name}" in text


def test_bad_or_stale_signature_gets_401(settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack) -> None:
    app = make_app(settings, fake_redis, slack)
    forged = s.command(f"status {IID}", secret="not-the-secret")
    assert app.dispatch(forged).status == 401
    body = s.command_body(f"status {IID}")
    stale = s.request(body, s.sign(body, timestamp=int(time.time()) - 6 * 60))
    assert app.dispatch(stale).status == 401
    future = s.request(body, s.sign(body, timestamp=int(time.time()) + 6 * 60))
    assert app.dispatch(future).status == 401
    unsigned = s.request(body, {"content-type": "application/x-www-form-urlencoded"})
    assert app.dispatch(unsigned).status == 401
    time.sleep(0.2)
    assert queued(fake_redis) == []
