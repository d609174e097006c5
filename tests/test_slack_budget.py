"""Slack's rate limits: chat.update is Tier 3 (about 50 a minute per workspace). Run
messages are coalesced (the last state wins) and a 429 reschedules the update rather
than sleeping in the monitor's tick.

Time is scaled 12x here: Slack's 50 a minute becomes the fake's 600, our 40 a minute
becomes 480, and a message's 3 s interval 0.25 s. Counts (bursts) are not scaled."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import Budget, FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs import monitor
from workers.jobs.train import train
from workers.services import Services
from workers.slack import updates
from workers.slack.ids import ActionId
from workers.slack.thread import open_run, publish
from workers.state import polls
from workers.state.runs import Progress, Run, RunState

from .slack import click
from .test_lifecycle import as_dict, dispatch, run_dir

SCALE = 12


def test_fifty_runs_stay_within_chat_update_budget_and_show_their_last_state(svc: Services, slack: FakeSlack) -> None:
    slack.budget("chat.update", Budget(per_minute=50 * SCALE, burst=50))
    svc.settings.RUNCTL_SLACK_UPDATES_PER_MINUTE = 40 * SCALE
    svc.settings.RUNCTL_SLACK_UPDATE_SECONDS = 3 / SCALE
    runs = []
    for n in range(50):  # five channels: chat.postMessage's per-channel burst is not under test
        run = Run(
            run_id=f"r-budget-{n:02d}",
            instance_id="i-0123456789abcdef0",
            user_id="U0ALICE",
            channel_id=f"C0RUNS{n % 5}",
            script="train.py",
            state=RunState.RUNNING,
        )
        runs.append(open_run(svc, svc.runs.create(run)))

    # The monitor's view of 50 live runs: a new epoch for each, ten times over, fast.
    for epoch in range(1, 11):
        for run in runs:
            run.progress = Progress(epoch=epoch, total_epochs=10)
            publish(svc, run)
        monitor.tick()
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while svc.redis.zcard(updates.PENDING) and time.monotonic() < deadline:
        monitor.tick()
        time.sleep(0.05)

    calls = slack.calls_to("chat.update")
    assert [c for c in calls if c.error] == []  # no 429 reached anyone
    assert len(calls) < 50 * 10  # coalesced
    for run in runs:  # the last state won everywhere
        [message] = [m for m in slack.messages(run.channel_id) if m.ts == run.message_ts]
        assert "epoch 10/10" in str(message.blocks), run.run_id
    # Within the fake's budget in every scaled minute (5 s), by construction of the test.
    starts = [c.at for c in calls]
    assert all(sum(1 for t in starts if s <= t < s + 60 / SCALE) <= 50 for s in starts)


def test_a_429_does_not_delay_other_runs_polls(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    who = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
    ids = []
    for name in ("gpu-box-1", "cpu-box"):
        cmd = TrainCommand(
            instance_id=fleet_seed.instances[name],
            script="train_with_checkpoints.py",
            args=("--epochs", "3", "--steps-per-epoch", "4", "--step-seconds", "0.25"),
        )
        ids.append(f"r-test-{uuid.uuid4().hex[:12]}")
        train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), ids[-1])
    before = {i: svc.runs.get(i).polls for i in ids}  # type: ignore[union-attr]
    slack.rate_limit("chat.update", times=100, retry_after=30)
    for run_id in ids:
        polls.schedule(svc, run_id, timedelta(0))

    started = time.monotonic()
    monitor.tick()
    took = time.monotonic() - started

    assert took < 15, took  # a sleeping retry would wait 30 s (x3) inside the tick
    after = {i: svc.runs.get(i).polls for i in ids}  # type: ignore[union-attr]
    assert all(after[i] > before[i] for i in ids), (before, after)  # both were polled
    waiting = {entry[0]: float(entry[1]) for entry in svc.redis.zrange(updates.PENDING, 0, -1, withscores=True)}
    assert len(waiting) == 2 and min(waiting.values()) >= time.time() + 20  # after Retry-After
    slack.reset()
    svc.redis.delete(updates.PENDING, updates.BLOCKED)
    worker.drain(timeout=60)  # let the runs finish


def test_an_end_and_a_watched_run_go_before_the_progress_waiting_for_the_budget(
    svc: Services, slack: FakeSlack
) -> None:
    """Issue 28's scheduler: with the budget spent on progress, a run's end is shown at once
    (it alone may take the reserve), and a run someone asked about is updated before the
    runs that only wait their turn."""
    svc.settings.RUNCTL_SLACK_UPDATES_PER_MINUTE = 60  # a token a second; the burst is updates.BURST
    svc.settings.RUNCTL_SLACK_UPDATE_SECONDS = 0
    runs = []
    for n in range(10):
        run = Run(
            run_id=f"r-sched-{n:02d}",
            instance_id="i-0123456789abcdef0",
            user_id="U0ALICE",
            channel_id=f"C0RUNS{n % 5}",
            script="train.py",
            state=RunState.RUNNING,
        )
        runs.append(open_run(svc, svc.runs.create(run)))
    for run in runs:  # the burst less the reserve goes out; the rest wait for the budget
        run.progress = Progress(epoch=1, total_epochs=10)
        publish(svc, run)
    waiting = {updates._text(m) for m in svc.redis.zrange(updates.PENDING, 0, -1)}
    assert len(waiting) == len(runs) - (updates.BURST - updates.RESERVE)
    ended, watched = runs[-1], runs[-2]
    assert ended.run_id in waiting and watched.run_id in waiting
    updates.watch(svc, watched.run_id)

    ended.state = RunState.SUCCEEDED
    publish(svc, ended)
    [parent] = [m for m in slack.messages(ended.channel_id) if m.ts == ended.message_ts]
    assert "finished" in str(parent.blocks).lower()  # shown at once, ahead of the line

    sent_before = len(slack.calls_to("chat.update"))
    deadline = time.monotonic() + 30
    while svc.redis.zcard(updates.PENDING) and time.monotonic() < deadline:
        updates.flush(svc)
        time.sleep(0.2)
    later = slack.calls_to("chat.update")[sent_before:]
    assert [c for c in later if c.error] == []
    assert later[0].params["ts"] == watched.message_ts  # the watched run first
    assert {c.params["ts"] for c in later} == {r.message_ts for r in runs if r.run_id in waiting} - {ended.message_ts}


def test_a_click_on_a_live_runs_full_log_puts_its_message_first_for_a_while(
    svc: Services, slack: FakeSlack, fleet_seed: SeedInfo, sandbox: Sandbox, worker: InlineWorker
) -> None:
    """Someone who clicks a live run's [Full log] is looking at it, as someone who asks its
    status is: its message goes before the runs that wait their turn, for WATCH_SECONDS."""
    iid = fleet_seed.instances["cpu-box"]
    run = Run(
        run_id="r-clicked-live",
        instance_id=iid,
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.RUNNING,
        started_at=datetime.now(UTC),  # it has a training.log: its message has [Full log]
    )
    folder = run_dir(sandbox, iid, run.run_id)
    folder.mkdir(parents=True)
    (folder / "pid").write_text(f"{os.getpid()}\n")
    (folder / "training.log").write_text("epoch 1/10 loss=0.5\n")
    run = open_run(svc, svc.runs.create(run))
    [parent] = [m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts]
    assert svc.redis.ttl(updates.WATCHED + run.run_id) < 0  # nobody has looked yet

    dispatch(svc, slack, worker, click(as_dict(parent), ActionId.FULL_LOG, "U0ALICE"))

    (attached,) = slack.files  # the click did what it says
    assert attached.thread_ts == run.message_ts and attached.content == b"epoch 1/10 loss=0.5\n"
    assert 0 < svc.redis.ttl(updates.WATCHED + run.run_id) <= updates.WATCH_SECONDS
    svc.redis.set(updates._sent_key(run.run_id), repr(time.time() - updates.WATCHED_EVERY))
    assert updates.band(svc, run.run_id) == updates.WATCH  # its next update goes before the rest


def test_an_end_reply_refused_with_429_past_the_clients_retries_is_posted_later_once(
    svc: Services, slack: FakeSlack, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    """Fifty runs ending at once in one channel meet its 1 post a second: a reply Slack still
    refuses after the client's retries (three, each waiting Retry-After) is posted by a job
    after Retry-After, not dropped (bench/scale.py lost 2 of 50 that way)."""
    iid = fleet_seed.instances["cpu-box"]
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=("--epochs", "1"))
    train(cmd.model_dump(mode="json"), Actor(user_id="U0ALICE", channel_id="C0TRAIN").model_dump(mode="json"), run_id)
    slack.rate_limit("chat.postMessage", times=4, retry_after=1)  # the first try and the client's 3 retries

    worker.drain(timeout=120)

    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED and run.message_ts
    refused = [c for c in slack.calls_to("chat.postMessage") if c.error == "ratelimited"]
    assert len(refused) == 4
    ends = [m.text for m in slack.thread("C0TRAIN", run.message_ts) if "finished (exit 0)" in m.text]
    assert len(ends) == 1 and ends[0].startswith("<@U0ALICE>"), ends
