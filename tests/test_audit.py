"""The audit trail: allowed, refused and failed actions are recorded, and
`/runctl audit` shows them to admins within Slack's limits."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis as redis_mod
from slack_bolt import App
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.jobs.audit import audit as audit_job
from workers.services import Services

from .conftest import TOKEN
from .slack import command

IID = "i-0123456789abcdef0"


@pytest.fixture
def app(svc: Services, slack: FakeSlack) -> App:
    return build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)


def show(app: App, worker: InlineWorker, slack: FakeSlack, text: str, user: str = "U0ADMIN") -> list[str]:
    app.dispatch(command(text, user=user))
    deadline = time.monotonic() + 5
    while not worker.pending() and time.monotonic() < deadline:  # Bolt queues after the ack
        time.sleep(0.01)
    worker.drain()
    (note,) = slack.ephemerals(user)[-1:]
    return [note.text, *(b["text"]["text"] for b in note.blocks if b["type"] == "section")]


def test_allowed_refused_and_failed_show_up_in_audit(
    app: App, svc: Services, slack: FakeSlack, worker: InlineWorker
) -> None:
    app.dispatch(command(f"terminate {IID}", user="U0BOB"))  # refused: admins only
    app.dispatch(command("train i-nope x.py", user="U0BOB"))  # failed: usage error
    app.dispatch(command("resources", user="U0ALICE"))  # allowed
    svc.redis.delete("rq:queue:runctl")  # we only want the front door's records here
    blocks = show(app, worker, slack, "audit 10")
    body = "\n".join(blocks[1:])
    assert blocks[0].startswith("*Audit*: the newest 4 records")  # the audit command itself is the 4th
    assert ":no_entry: refused · `/runctl terminate i-0123456789abcdef0` → PermissionDenied" in body
    assert ":x: failed · `/runctl train i-nope x.py` → usage error" in body
    assert ":white_check_mark: allowed · `/runctl resources` → queued" in body
    assert body.index("terminate") > body.index("resources")  # newest first
    # The audit job recorded that it answered.
    assert audit.newest(svc.redis, 1)[0].outcome == "showed 4 records"


def test_audit_filters_and_is_for_admins(app: App, svc: Services, slack: FakeSlack, worker: InlineWorker) -> None:
    for user, iid in [("U0ALICE", IID), ("U0BOB", IID), ("U0ALICE", "i-0123456789abcdef1")]:
        audit.record(svc.redis, 1000, audit.Record(user=user, decision="allowed", instance=iid, text="/runctl status"))
    body = "\n".join(show(app, worker, slack, f"audit --instance {IID} --user <@U0ALICE>"))
    assert "newest 1 record on `i-0123456789abcdef0` by <@U0ALICE>" in body
    assert "<@U0BOB>" not in body.split("\n", 1)[1]
    refused = json.loads(app.dispatch(command("audit", user="U0ALICE")).body)
    assert refused["response_type"] == "ephemeral"
    assert "You can't `audit`" in refused["text"] and "<@U0ADMIN>" in refused["text"]


def test_audit_user_typed_as_plain_text_is_resolved(
    app: App, svc: Services, slack: FakeSlack, worker: InlineWorker
) -> None:
    slack.add_user("U0ALICE", "alice", display_name="Alice")
    slack.add_user("U0BOB", "bob")
    for user in ("U0ALICE", "U0BOB"):
        audit.record(svc.redis, 1000, audit.Record(user=user, decision="allowed", instance=IID, text="/runctl status"))
    body = "\n".join(show(app, worker, slack, "audit --user @Alice"))
    assert "newest 1 record by <@U0ALICE>" in body and "<@U0BOB>" not in body.split("\n", 1)[1]
    assert "No one in this Slack workspace is called `@carol`" in show(app, worker, slack, "audit --user @carol")[0]


def test_audit_output_stays_within_slack_limits_and_escapes_user_text(svc: Services, slack: FakeSlack) -> None:
    hostile = "/runctl train i-0123456789abcdef0 t.py -- <!channel> <@U0ADMIN> `x` " + "y" * 900
    for n in range(250):
        audit.record(
            svc.redis, 1000, audit.Record(user=f"U0USER{n}", decision="failed", text=hostile, outcome="x" * 500)
        )
    audit_job({"name": "audit", "count": 200}, {"user_id": "U0ADMIN", "channel_id": "C0TRAIN"})
    (note,) = slack.ephemerals("U0ADMIN")  # the fake Slack rejects anything over the limits
    assert len(note.blocks) <= 50
    assert all(len(b["text"]["text"]) <= 3000 for b in note.blocks if b["type"] == "section")
    text = "\n".join(b["text"]["text"] for b in note.blocks if b["type"] == "section")
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text
    assert "U0USER249" in text  # newest first


def test_stream_is_capped_and_every_record_is_one_json_log_line(
    real_redis: redis_mod.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="runctl.audit"):
        for n in range(1000):
            audit.record(
                real_redis, 100, audit.Record(user="U0A", decision="allowed", text=f"n{n}", run_id="r1", instance=IID)
            )
    assert 100 <= real_redis.xlen(audit.STREAM) < 1000
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runctl.audit"]
    assert len(lines) == 1000
    assert set(lines[0]) >= {"time", "user", "channel", "text", "decision", "outcome", "run_id", "instance"}
    assert audit.newest(real_redis, 1)[0].text == "n999"


def test_worker_records_the_outcome_of_a_train(svc: Services, slack: FakeSlack) -> None:
    from workers.jobs.train import train

    who = {"user_id": "U0ALICE", "channel_id": "C0TRAIN", "text": f"train {IID} missing.py"}
    train({"name": "train", "instance_id": IID, "script": "missing.py"}, who, "r-audit-fail")
    entry = audit.newest(svc.redis, 1)[0]
    assert (entry.decision, entry.run_id, entry.instance, entry.source) == ("failed", "r-audit-fail", IID, "worker")
    assert entry.text == f"/runctl train {IID} missing.py" and entry.outcome.startswith("not started")
