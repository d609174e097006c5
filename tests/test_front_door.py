"""The slash-command front door: one Redis round trip decides replay and rate; the
allowed record and the job land together."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis as redis_mod
from rq import Queue
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from tests.conftest import REDIS_URL, TOKEN
from tests.slack import command
from workers import audit
from workers.queueing import LONG_QUEUE, QUEUE, connect_front
from workers.settings import Settings
from workers.state.locks import Holder, train_lock

from .queues import queued

IID = "i-0123456789abcdef0"


def make(settings: Settings, redis: redis_mod.Redis, slack: FakeSlack) -> App:
    """The app on the web process's own client for the same Redis (fails fast; hiredis packs its commands)."""
    front = connect_front(REDIS_URL) if type(redis) is redis_mod.Redis else redis  # fakeredis stays itself
    return build_app(settings, front, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)


def test_the_front_doors_client_sends_what_redis_py_would(real_redis: redis_mod.Redis) -> None:
    front = connect_front(REDIS_URL)
    values: list[Any] = [
        "plain",
        "é ✓ 日本",
        b"\x00\xffbytes",
        42,
        -7,
        0.1,
        1e-7,
        2**70,
        bytearray(b"ba"),
        memoryview(b"mv"),
    ]
    for n, value in enumerate(values):
        front.set(f"k{n}", value)
        real_redis.set(f"r{n}", bytes(value) if isinstance(value, bytearray | memoryview) else value)
        assert front.get(f"k{n}") == real_redis.get(f"r{n}")
    sha = front.script_load("return ARGV[1]")  # SCRIPT LOAD: two words, as redis-py sends them
    assert front.evalsha(sha, 0, "é") == "é".encode()
    for bad in (True, None):
        with pytest.raises(redis_mod.DataError):
            front.set("bad", bad)  # type: ignore[arg-type]


def text(response: Any) -> str:
    return str(json.loads(response.body)["text"]) if response.body else ""


def test_the_rate_limit_counts_commands_not_help_or_usage_errors_and_a_replay_does_not(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    # Issue 17: help and usage errors never reach AWS, so they are not counted.
    settings.RUNCTL_RATE_PER_MINUTE = 3
    app = make(settings, real_redis, slack)
    for _ in range(5):
        assert "Missing <instance-id>" in text(app.dispatch(command("status", user="U0CARL")))
        assert "/runctl train" in text(app.dispatch(command("help", user="U0CARL")))
    first = command(f"status {IID}", user="U0CARL", trigger_id="t.same")
    assert text(app.dispatch(first)) == ""  # accepted: the answer itself is the one message
    assert text(app.dispatch(command(f"status {IID}", user="U0CARL", trigger_id="t.same"))) == ""
    assert app.dispatch(command(f"status {IID}", user="U0CARL")).body == ""
    assert app.dispatch(command(f"status {IID}", user="U0CARL")).body == ""
    over = text(app.dispatch(command(f"status {IID}", user="U0CARL")))
    assert "you sent 3 runctl requests" in over and "Try again in" in over
    assert Queue(QUEUE, connection=real_redis).count == 3


def test_an_allowed_command_is_audited_with_its_job(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = make(settings, real_redis, slack)
    assert app.dispatch(command(f"train {IID} train.py -- --epochs 1", user="U0DANA")).status == 200
    (entry,) = audit.newest(real_redis, 5, user="U0DANA")
    assert (entry.decision, entry.outcome, entry.instance) == ("allowed", "queued", IID)
    (job,) = Queue(LONG_QUEUE, connection=real_redis).jobs  # a train may build an environment: the long queue
    assert job.func_name == "workers.jobs.train.train" and job.args[1]["user_id"] == "U0DANA"
    # What RQ's workers log for it: not its arguments (a response_url in them is a credential).
    assert job.description == "workers.jobs.train.train for U0DANA"


def test_help_is_audited_as_answered_and_queues_nothing(
    settings: Settings, fake_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    app = make(settings, fake_redis, slack)
    assert "/runctl train <instance-id>" in text(app.dispatch(command("help train", user="U0ERIN")))
    assert [e.outcome for e in audit.newest(fake_redis, 5, user="U0ERIN")] == ["answered"]
    assert queued(fake_redis) == []


def test_a_user_flooding_signed_usage_errors_is_answered_and_not_slowed_down(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    settings.RUNCTL_RATE_PER_MINUTE = 5
    app = make(settings, real_redis, slack)
    answers = [text(app.dispatch(command("status", user="U0MALLORY"))) for _ in range(8)]
    assert all("Missing <instance-id>" in a for a in answers)
    # Uncounted: a real command still goes through after the flood.
    assert app.dispatch(command(f"status {IID}", user="U0MALLORY")).body == ""
    assert Queue(QUEUE, connection=real_redis).count == 1


def test_admins_audit_records_survive_a_flood(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    """One user's flood cannot evict the others' records from the length-capped stream:
    past RUNCTL_AUDIT_PER_MINUTE a user's records are counted, and the count recorded."""
    settings.RUNCTL_AUDIT_MAXLEN = 100
    app = make(settings, real_redis, slack)
    assert app.dispatch(command(f"status {IID}", user="U0ADMIN")).body == ""
    flood = 400
    for _ in range(flood):
        app.dispatch(command("status", user="U0MALLORY"))
    records = audit.newest(real_redis, 1000)
    assert [r.text for r in records if r.user == "U0ADMIN"] == [f"/runctl status {IID}"]
    mallory = [r for r in records if r.user == "U0MALLORY"]
    cap = settings.RUNCTL_AUDIT_PER_MINUTE
    assert len(mallory) <= 2 * cap + 3  # if the flood crossed a minute: cap + marker, summary + cap + marker
    assert any(r.decision == "dropped" and "are dropped" in r.outcome for r in mallory)
    # Mallory's next record in a later minute first records how many were dropped.
    later = audit.Record(
        user="U0MALLORY", decision="failed", text="/runctl status", time=records[0].time + timedelta(minutes=2)
    )
    audit.record(real_redis, settings.RUNCTL_AUDIT_MAXLEN, later, cap)
    mallory = [r for r in audit.newest(real_redis, 1000) if r.user == "U0MALLORY"]
    counted = [int(m.group(1)) for r in mallory if (m := re.match(r"(\d+) more from U0MALLORY dropped", r.outcome))]
    written = [r for r in mallory if r.decision != "dropped"]
    assert counted and sum(counted) + len(written) == flood + 1


def test_a_train_is_written_with_its_record_once_and_only_when_admitted(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack
) -> None:
    """The door's one script (issue 28): a replay writes nothing more, a train over the rate
    limit writes no job (its refusal is audited), and a train on a busy instance writes its
    record and no job (the ack says who holds the instance)."""
    settings.RUNCTL_RATE_PER_MINUTE = 2
    app = make(settings, real_redis, slack)
    train = f"train {IID} train.py -- --epochs 1"
    long_queue = Queue(LONG_QUEUE, connection=real_redis)
    assert "Queued run" in text(app.dispatch(command(train, user="U0DANA", trigger_id="t.once")))
    assert text(app.dispatch(command(train, user="U0DANA", trigger_id="t.once"))) == ""  # Slack's retry
    assert long_queue.count == 1
    assert [e.decision for e in audit.newest(real_redis, 10, user="U0DANA")] == ["allowed"]

    holder = Holder(run_id="r-alice", user_id="U0ALICE", script="train.py", since=datetime.now(UTC))
    assert train_lock(real_redis, IID).acquire(holder.token())
    busy = text(app.dispatch(command(train, user="U0DANA")))
    assert "<@U0ALICE>" in busy and "Queued run" not in busy
    assert long_queue.count == 1
    assert [e.decision for e in audit.newest(real_redis, 10, user="U0DANA")] == ["allowed", "allowed"]

    over = text(app.dispatch(command(train, user="U0DANA")))
    assert "you sent 2 runctl requests" in over
    assert long_queue.count == 1
    newest = audit.newest(real_redis, 10, user="U0DANA")[0]
    assert (newest.decision, newest.outcome.split(":")[0]) == ("refused", "RateLimited")
