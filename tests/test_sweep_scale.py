"""The sweep at fleet scale against the fake's Slack rates (DEFAULT_BUDGETS: chat.postMessage
about 1 a second per channel with a short burst, chat.update Tier 3, about 50 a minute):
warnings are grouped into few posts, the rest follow in later sweeps, a post is updated
only when what it shows changed, and a 429 reschedules instead of sleeping."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import DEFAULT_BUDGETS, MAX_BLOCKS, Call, FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.jobs import monitor
from workers.jobs.sweep import MAX_POSTS, sweep
from workers.services import Services
from workers.slack import updates
from workers.slack.ids import ActionId
from workers.slack.messages.warning import PER_POST
from workers.state.warnings import Status, WarningStore, button_value

from .conftest import TOKEN
from .fleetgen import generate, install_fleet
from .slack import action, click

OPS = "C0OPS"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def errors(slack: FakeSlack) -> list[tuple[str, str | None]]:
    """Slack's refusals of the sweep's calls (its channel: a late update of another test's
    message, which the session's fake Slack no longer holds, is not the sweep's)."""
    return [(c.method, c.error) for c in slack.calls if c.error and c.params.get("channel") == OPS]


def ops(calls: list[Call]) -> list[Call]:
    """The sweep's calls, in its channel (not a late update of another test's message)."""
    return [c for c in calls if c.params.get("channel") == OPS]


def blocks_of(params: dict[str, Any]) -> list[dict[str, Any]]:
    raw = params.get("blocks") or []
    return json.loads(raw) if isinstance(raw, str) else list(raw)


@pytest.fixture
def fleet(svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """300 generated instances, up to 50 h old: a few hundred warnings in one channel."""
    for method, budget in DEFAULT_BUDGETS.items():  # Slack's rates, whatever the session's fake says
        slack.budget(method, budget)
    clock = Clock(datetime.fromisoformat("2026-03-10T09:00:00+00:00"))
    svc.clock = clock
    install_fleet(svc, generate(300, clock.now))
    svc.settings.RUNCTL_SLACK_UPDATES_PER_MINUTE = 40  # production's default, under Slack's 50
    return clock


def test_a_fleets_warnings_are_posted_in_few_messages_and_the_rest_in_later_sweeps(
    svc: Services, slack: FakeSlack, fleet: Clock
) -> None:
    store = WarningStore(svc.redis)

    sweep()

    warned = store.open()
    assert len(warned) > MAX_POSTS * PER_POST  # more than one sweep may post
    posts = slack.calls_to("chat.postMessage")
    assert errors(slack) == []  # no 429, no invalid_blocks
    assert len(posts) == MAX_POSTS  # not one per warning
    assert all(len(blocks_of(c.params)) <= MAX_BLOCKS for c in posts)
    [head] = [m for m in slack.messages(OPS) if m.thread_ts is None]
    assert len(slack.thread(OPS, head.ts)) == MAX_POSTS - 1  # the overflow is in its thread
    left = len(warned) - MAX_POSTS * PER_POST
    assert f"{(MAX_POSTS - 1) * PER_POST} more in the thread" in str(head.blocks)
    assert f"{left} more did not fit" in str(head.blocks)

    for _ in range(60):  # the next sweeps post the rest, within the burst and 1 a second
        if not store.unposted():
            break
        fleet.now += timedelta(minutes=5)  # (in real time the sweeps here come within seconds)
        before = len(slack.calls_to("chat.postMessage"))
        sweep()
        assert len(slack.calls_to("chat.postMessage")) - before <= MAX_POSTS
        time.sleep(0.5)
    assert store.unposted() == []
    assert errors(slack) == []
    shown = [
        b["elements"][0]["value"]
        for c in slack.calls_to("chat.postMessage")
        for b in blocks_of(c.params)
        if b["type"] == "actions"
    ]
    everyone = {button_value(r.instance_id, r.kind) for r in store.open()}  # later sweeps found more
    assert len(shown) == len(set(shown)) and set(shown) == everyone  # each once, with its buttons


def test_updates_go_through_the_coalescer_only_when_a_post_changed(
    svc: Services, slack: FakeSlack, fleet: Clock
) -> None:
    store = WarningStore(svc.redis)
    for _ in range(60):  # the whole fleet's warnings posted, at one moment of the fleet's clock
        sweep()
        if not store.unposted():
            break
        time.sleep(1)
    assert ops(slack.calls_to("chat.update")) == []  # what the posts show did not change
    mark = len(slack.calls)

    sweep()  # the same moment again: nothing a post shows changed
    assert ops(slack.calls[mark:]) == []
    posts = len({(r.channel, r.ts) for r in store.open() if r.ts})
    assert posts > updates.BURST

    fleet.now += timedelta(minutes=5)
    started = time.monotonic()
    sweep()  # every post changed (idle times, costs): the coalescer's budget, not one call each
    took = time.monotonic() - started
    assert took < 20, took  # no sleeping on Slack's behalf
    calls = [c for c in ops(slack.calls[mark:]) if c.method == "chat.update"]
    assert [c.error for c in ops(slack.calls[mark:]) if c.error] == [] and 0 < len(calls) <= updates.BURST
    waiting = svc.redis.zcard(updates.PENDING)
    assert len(calls) + waiting == posts  # the rest wait their turn, each post once
    assert float(svc.redis.zrange(updates.PENDING, 0, 0, withscores=True)[0][1]) > time.time()


def test_a_429_on_a_warning_post_reschedules_and_the_tick_does_not_wait(
    svc: Services, slack: FakeSlack, fleet: Clock
) -> None:
    sweep()
    fleet.now += timedelta(minutes=5)
    slack.rate_limit("chat.update", times=100, retry_after=30)
    started = time.monotonic()
    sweep()
    monitor.tick()  # the tick flushes due updates: it must not wait out the 30 s either
    took = time.monotonic() - started
    assert took < 15, took  # a sleeping retry would wait 30 s (x3)
    ratelimited = [c for c in slack.calls_to("chat.update") if c.error == "ratelimited"]
    assert len(ratelimited) == 1  # the first 429 blocks the rest; they are not tried again and again
    waiting = {entry[0]: float(entry[1]) for entry in svc.redis.zrange(updates.PENDING, 0, -1, withscores=True)}
    assert waiting and min(waiting.values()) >= time.time() + 20  # after Retry-After


def test_a_button_deep_in_an_overflow_post_acts_on_its_own_warning(
    svc: Services, slack: FakeSlack, fleet: Clock, worker: InlineWorker
) -> None:
    sweep()
    reply = slack.thread(OPS, next(m for m in slack.messages(OPS) if m.thread_ts is None).ts)[-1]
    values = [e["value"] for b in reply.blocks if b["type"] == "actions" for e in b["elements"]]
    target = values[len(values) // 2]
    iid, _, kind = target.partition("|")
    record = next(r for r in WarningStore(svc.redis).open() if r.key == f"{iid}:{kind}")
    assert record.owner is not None

    message = {"type": "message", "ts": reply.ts, "text": reply.text, "blocks": reply.blocks}
    payload = click(message, ActionId.WARN_SNOOZE, record.owner, channel=OPS, value=target)
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    assert app.dispatch(action(payload)).status == 200
    deadline = time.monotonic() + 5
    while worker.pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.drain(timeout=60)

    statuses = {r.key: r.status for r in WarningStore(svc.redis).open()}
    assert statuses.pop(record.key) is Status.SNOOZED
    assert set(statuses.values()) == {Status.OPEN}  # only that one
    [now] = [m for m in slack.messages(OPS) if m.ts == reply.ts]
    [section] = [b for b in now.blocks if b.get("block_id") == f"warning:{record.key}"]
    assert f"Snoozed by <@{record.owner}>" in section["text"]["text"]
    assert f"warning_actions:{record.key}" not in {b.get("block_id") for b in now.blocks}
