"""The periodic sweep against moto + real Redis with a fixed clock: which warnings
it posts, that it never posts one twice, and what the buttons do."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from slack_sdk import WebClient

from bot.actions.warnings import KEEP_VIEW, REASON_BLOCK, REASON_INPUT
from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message, OpenedView
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.jobs.sweep import sweep
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.runs import Checkpoint, Run, RunState
from workers.state.warnings import Kind, Status, WarningRecord, WarningStore, button_value

from .conftest import TOKEN
from .slack import action, click, trigger_id

OPS = "C0OPS"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def launched(svc: Services, iid: str) -> datetime:
    inst = svc.fleet.get(iid)
    assert inst.launch_time is not None
    return inst.launch_time


def _all_text(m: Message) -> str:
    return m.text + " " + str(m.blocks)


def posted_warnings(slack: FakeSlack) -> list[tuple[str, Kind]]:
    """(instance, kind) of every warning in every post the bot made, in order."""
    found = []
    for call in slack.calls_to("chat.postMessage"):
        if call.error is not None:
            continue
        raw = call.params.get("blocks") or []
        for block in json.loads(raw) if isinstance(raw, str) else raw:
            iid, _, kind = str(block.get("block_id", "")).removeprefix("warning:").rpartition(":")
            if block["type"] == "section" and str(block.get("block_id", "")).startswith("warning:"):
                found.append((iid, Kind(kind)))
    return found


def kinds_posted(slack: FakeSlack, iid: str) -> list[str]:
    return sorted(kind.value for posted_iid, kind in posted_warnings(slack) if posted_iid == iid)


def post_of(slack: FakeSlack, record: WarningRecord | None) -> Message:
    """The message that shows `record`, as Slack shows it now."""
    assert record is not None and record.ts is not None
    return next(m for m in slack.messages(record.channel) if m.ts == record.ts)


def shown(slack: FakeSlack, record: WarningRecord | None) -> str:
    """The text of `record`'s own section in its post."""
    assert record is not None
    [block] = [b for b in post_of(slack, record).blocks if b.get("block_id") == f"warning:{record.key}"]
    return str(block["text"]["text"])


def buttons(slack: FakeSlack, record: WarningRecord | None) -> list[str]:
    """The action ids of `record`'s own buttons (none once decided or resolved)."""
    assert record is not None
    return [
        e["action_id"]
        for b in post_of(slack, record).blocks
        if b["type"] == "actions" and b.get("block_id") == f"warning_actions:{record.key}"
        for e in b["elements"]
    ]


def press(slack: FakeSlack, record: WarningRecord | None, button: str, user: str) -> dict[str, Any]:
    """The block_actions payload of `user` clicking `record`'s own `button`."""
    assert record is not None
    return click(
        as_dict(post_of(slack, record)), button, user, channel=OPS, value=button_value(record.instance_id, record.kind)
    )


def as_dict(m: Message) -> dict[str, Any]:
    return {"type": "message", "ts": m.ts, "text": m.text, "blocks": m.blocks}


def ended_run(iid: str, user: str, ended_at: datetime) -> Run:
    return Run(
        run_id="r-done-1",
        instance_id=iid,
        user_id=user,
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.SUCCEEDED,
        created_at=ended_at - timedelta(hours=3),
        started_at=ended_at - timedelta(hours=3),
        ended_at=ended_at,
        exit_code=0,
    )


@pytest.fixture
def clock(svc: Services, fleet_seed: SeedInfo) -> Clock:
    """30 hours after the seeded fleet was launched."""
    c = Clock(launched(svc, fleet_seed.instances["gpu-box-1"]) + timedelta(hours=30))
    svc.clock = c
    return c


def test_long_uptime_high_cost_and_idle_are_warned_in_the_channel(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock
) -> None:
    gpu, cpu, old = (fleet_seed.instances[n] for n in ("gpu-box-1", "cpu-box", "old-box"))
    svc.runs.create(ended_run(gpu, "U0ALICE", clock.now - timedelta(hours=2)))

    sweep()

    # g5.xlarge at $1.006/h for 30 h: over 24 h, over $10, idle 2 h since the run ended.
    assert kinds_posted(slack, gpu) == ["cost", "idle", "uptime"]
    store = WarningStore(svc.redis)
    texts = {kind: shown(slack, store.get(gpu, kind)) for kind in (Kind.UPTIME, Kind.COST, Kind.IDLE)}
    assert "running for 1d 6h in total" in texts[Kind.UPTIME]
    assert "$30.18 so far" in texts[Kind.COST]
    idle = texts[Kind.IDLE]
    assert "idle for 2h 00m" in idle and "since run `r-done-1` ended" in idle
    assert "that idle time cost $2.01" in idle
    assert all("<@U0ALICE>" in t for t in texts.values())  # the last run's owner
    assert all(f"/runctl stop {gpu}" in t for t in texts.values())
    # t3.medium: 30 h is long and idle, but $1.25 is under the cost limit.
    assert kinds_posted(slack, cpu) == ["idle", "uptime"]
    assert kinds_posted(slack, old) == []  # stopped
    for kind in (Kind.UPTIME, Kind.COST, Kind.IDLE):
        assert buttons(slack, store.get(gpu, kind)) == [
            ActionId.WARN_STOP_NOW,
            ActionId.WARN_SNOOZE,
            ActionId.WARN_KEEP,
        ]
    # One message for the whole sweep in the channel, not one per warning.
    assert len([c for c in slack.calls_to("chat.postMessage") if c.params.get("channel") == OPS]) == 1


def test_a_run_without_a_new_checkpoint_is_warned_in_its_own_thread(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    parent = svc.notifier.post("C0TRAIN", "run parent")
    run = Run(
        run_id="r-quiet-1",
        instance_id=iid,
        user_id="U0BOB",
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.RUNNING,
        started_at=clock.now - timedelta(hours=5),
        message_ts=parent,
        checkpoint=Checkpoint(name="ckpt-epoch-00003.json", size=10, modified_at=clock.now - timedelta(minutes=95)),
    )
    svc.runs.create(run)
    svc.runs.save(run)

    sweep()

    replies = slack.thread("C0TRAIN", parent)
    assert len(replies) == 1
    text = _all_text(replies[0])
    assert "<@U0BOB>" in text and "r-quiet-1" in text
    assert "no new checkpoint for 1h 35m" in text and "ckpt-epoch-00003.json" in text
    assert "idle" not in kinds_posted(slack, iid)  # it is training


def test_two_sweeps_at_once_post_each_warning_once_and_later_sweeps_update_it(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sweep()
    clock.advance(hours=1)
    sweep()

    assert kinds_posted(slack, iid) == ["cost", "idle", "uptime"]
    idle = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert idle is not None and idle.ts is not None
    updates = [c for c in slack.calls_to("chat.update") if c.params.get("ts") == idle.ts]
    assert updates, "later sweeps refresh the existing message"
    assert "idle for 1d 7h" in shown(slack, idle)  # 31 h now


def dispatch(svc: Services, slack: FakeSlack, worker: InlineWorker, payload: dict[str, Any]) -> None:
    payload["response_url"] = slack.response_url("warning")
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    before = worker.pending()
    response = app.dispatch(action(payload))
    assert response.status == 200
    deadline = time.monotonic() + 5
    while worker.pending() == before and time.monotonic() < deadline:
        time.sleep(0.02)  # Bolt runs the listener after the ack, in its own thread
    worker.drain(timeout=60)


def test_snooze_silences_a_warning_for_24_hours(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0CAROL", clock.now - timedelta(hours=2)))  # Snooze is the owner's
    sweep()
    idle = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert idle is not None

    dispatch(svc, slack, worker, press(slack, idle, ActionId.WARN_SNOOZE, "U0CAROL"))

    snoozed = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert snoozed is not None and snoozed.status is Status.SNOOZED
    said = shown(slack, idle)
    assert "Snoozed by <@U0CAROL>" in said
    assert buttons(slack, idle) == []  # the decision is made
    cost = WarningStore(svc.redis).get(iid, Kind.COST)
    assert buttons(slack, cost) == [ActionId.WARN_STOP_NOW, ActionId.WARN_SNOOZE, ActionId.WARN_KEEP]  # not this one's

    clock.advance(hours=23)
    sweep()
    assert kinds_posted(slack, iid).count("idle") == 1
    assert shown(slack, idle) == said  # silenced: not refreshed

    clock.advance(hours=2)  # the window is over and it is still idle: warn again
    sweep()
    assert kinds_posted(slack, iid).count("idle") == 2


def test_keep_running_records_who_kept_it(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0DAVE", clock.now - timedelta(hours=2)))  # Keep is the owner's
    sweep()
    cost = WarningStore(svc.redis).get(iid, Kind.COST)
    assert cost is not None

    pressed = press(slack, cost, ActionId.WARN_KEEP, "U0DAVE")
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    assert app.dispatch(action(pressed)).status == 200
    [opened] = slack.wait_for(slack.views)  # the modal asks for the reason; nothing is decided yet
    assert opened.trigger_id == pressed["trigger_id"] and opened.view["callback_id"] == KEEP_VIEW
    assert WarningStore(svc.redis).get(iid, Kind.COST).status is Status.OPEN  # type: ignore[union-attr]

    reason = "final eval <!channel> needs `one` more day"
    assert app.dispatch(action(submission(opened, "U0DAVE", reason))).status == 200
    worker.drain(timeout=60)

    kept = WarningStore(svc.redis).get(iid, Kind.COST)
    assert kept is not None and kept.status is Status.KEPT and kept.acted_by == "U0DAVE"
    assert kept.reason == reason
    said = shown(slack, cost)
    assert "Kept running by <@U0DAVE>" in said and "final eval" in said


def submission(opened: OpenedView, user: str, reason: str) -> dict[str, Any]:
    """The view_submission Slack sends when `user` submits the modal with `reason` typed in."""
    return {
        "type": "view_submission",
        "team": {"id": "T0TEAM", "domain": "example"},
        "user": {"id": user, "username": user.lower(), "team_id": "T0TEAM"},
        "api_app_id": "A0RUNCTL",
        "token": "legacy",
        "trigger_id": trigger_id(),
        "view": {
            **opened.view,
            "id": opened.id,
            "team_id": "T0TEAM",
            "state": {"values": {REASON_BLOCK: {REASON_INPUT: {"type": "plain_text_input", "value": reason}}}},
        },
    }


def test_warning_resolves_when_the_instance_stops(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    sweep()
    uptime = WarningStore(svc.redis).get(iid, Kind.UPTIME)
    assert uptime is not None
    svc.fleet.stop(iid)
    clock.advance(minutes=5)
    sweep()
    assert "Resolved (the instance is stopped)" in shown(slack, uptime)
    assert buttons(slack, uptime) == []


def test_stop_now_stops_the_instance_through_the_stop_flow(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0ALICE", clock.now - timedelta(hours=2)))
    sweep()
    idle = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert idle is not None

    dispatch(svc, slack, worker, press(slack, idle, ActionId.WARN_STOP_NOW, "U0ALICE"))

    assert svc.fleet.get(iid).state in ("stopping", "stopped")
    stopping = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert stopping is not None and stopping.acted_by == "U0ALICE"
    assert slack.thread(OPS, idle.ts or ""), "the stop summary goes into the warning's thread"
    assert "Stop requested by <@U0ALICE>" in shown(slack, idle)
    clock.advance(minutes=5)
    sweep()
    resolved = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert resolved is not None and resolved.status is Status.RESOLVED


def test_stop_now_is_refused_for_someone_who_is_not_the_owner(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0ALICE", clock.now - timedelta(hours=2)))
    sweep()
    idle = WarningStore(svc.redis).get(iid, Kind.IDLE)
    assert idle is not None

    dispatch(svc, slack, worker, press(slack, idle, ActionId.WARN_STOP_NOW, "U0MALLORY"))

    assert svc.fleet.get(iid).state == "running"
    [said] = slack.ephemerals("U0MALLORY")
    assert "You can't `stop` here" in said.text and said.channel == OPS


def test_snooze_and_keep_are_the_owners_or_an_admins(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0ALICE", clock.now - timedelta(hours=2)))
    sweep()
    idle, cost = (WarningStore(svc.redis).get(iid, k) for k in (Kind.IDLE, Kind.COST))
    assert idle is not None and cost is not None and idle.owner == "U0ALICE"
    for record, button in ((idle, ActionId.WARN_SNOOZE), (cost, ActionId.WARN_KEEP)):
        app_dispatch(svc, slack, press(slack, record, button, "U0MALLORY"))
    worker.drain(timeout=30)
    assert [WarningStore(svc.redis).get(iid, k).status for k in (Kind.IDLE, Kind.COST)] == [Status.OPEN] * 2  # type: ignore[union-attr]
    said = [n.text for n in slack.ephemerals("U0MALLORY")]
    assert len(said) == 2 and "You can't `snooze`" in said[0] and "You can't `keep`" in said[1]
    refused = [r for r in audit.newest(svc.redis, 20, user="U0MALLORY") if r.decision == "refused"]
    assert {r.text for r in refused} == {"snooze idle warning", "keep cost warning"}

    dispatch(svc, slack, worker, press(slack, idle, ActionId.WARN_SNOOZE, "U0ADMIN"))
    assert WarningStore(svc.redis).get(iid, Kind.IDLE).status is Status.SNOOZED  # type: ignore[union-attr]


def keep_submission(iid: str, user: str, reason: str) -> dict[str, Any]:
    """A view_submission of the [Keep running] modal, as Slack sends it."""
    return {
        "type": "view_submission",
        "team": {"id": "T0TEAM", "domain": "example"},
        "user": {"id": user, "username": user.lower(), "team_id": "T0TEAM"},
        "api_app_id": "A0RUNCTL",
        "token": "legacy",
        "trigger_id": f"trig.{time.monotonic_ns()}",
        "view": {
            "id": f"V{time.monotonic_ns()}",
            "type": "modal",
            "callback_id": KEEP_VIEW,
            "private_metadata": json.dumps({"instance_id": iid, "kind": Kind.COST.value}),
            "state": {"values": {REASON_BLOCK: {REASON_INPUT: {"type": "plain_text_input", "value": reason}}}},
            "hash": "1700000000.abc",
        },
        "response_urls": [],
    }


def app_dispatch(svc: Services, slack: FakeSlack, payload: dict[str, Any]) -> dict[str, Any]:
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    response = app.dispatch(action(payload))
    assert response.status == 200
    return json.loads(response.body) if response.body else {}


def test_the_keep_running_modal_is_checked_rate_limited_and_audited(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, clock: Clock, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.runs.create(ended_run(iid, "U0ALICE", clock.now - timedelta(hours=2)))
    sweep()
    svc.settings.RUNCTL_RATE_PER_MINUTE = 2

    answer = app_dispatch(svc, slack, keep_submission(iid, "U0MALLORY", "mine now"))
    assert answer["response_action"] == "errors" and "owner or an admin" in answer["errors"][REASON_BLOCK]
    assert worker.pending() == 0
    assert WarningStore(svc.redis).get(iid, Kind.COST).status is Status.OPEN  # type: ignore[union-attr]
    trail = [(r.text, r.decision) for r in audit.newest(svc.redis, 10, user="U0MALLORY")]
    assert trail == [("keep cost warning", "refused"), (f"submit {KEEP_VIEW}", "allowed")]

    assert app_dispatch(svc, slack, keep_submission(iid, "U0ALICE", "eval <b>run</b> until 18:00")) == {}
    worker.drain(timeout=30)
    kept = WarningStore(svc.redis).get(iid, Kind.COST)
    assert kept is not None and kept.status is Status.KEPT and kept.acted_by == "U0ALICE"
    assert kept.reason == "eval <b>run</b> until 18:00"

    app_dispatch(svc, slack, keep_submission(iid, "U0ALICE", "again"))
    assert app_dispatch(svc, slack, keep_submission(iid, "U0ALICE", "and again")) == {}  # closed; told by DM
    assert worker.pending() == 1  # the second submission; the third was over the limit
    (dm,) = [m for m in slack.messages("U0ALICE") if "Slow down" in m.text]
    assert "you sent 2 runctl requests" in dm.text
    assert audit.newest(svc.redis, 1, user="U0ALICE")[0].decision == "refused"
