"""A busy instance takes the next run in line (issue 27): through signed commands and clicks,
two RQ workers racing (two in-process `SimpleWorker`s on separate threads, the same Redis),
the sandbox's instances really running the trainings, and the fake Slack."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs import queued
from workers.jobs.autostop import stop_idle
from workers.jobs.reconcile import reconcile
from workers.jobs.sweep import sweep
from workers.queueing import JobPath
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.locks import Holder, train_lock
from workers.state.run_queue import PREFIX, Entry, QueueStore
from workers.state.runs import Run, RunState

from .conftest import BUCKET, TOKEN
from .queues import queued as queued_jobs
from .slack import click, command
from .test_funnel import write_policy
from .test_lifecycle import send_click, text_of

CHANNEL = "C0TRAIN"
ALICE, BOB, CAROL, DAVE, ADMIN, MALLORY = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE", "U0ADMIN", "U0MALLORY"
SCRIPT = "train_with_checkpoints.py"
SHORT = "-- --epochs 2 --steps-per-epoch 2 --step-seconds 0.1"


def long_run(epochs: int = 30) -> str:
    return f"-- --epochs {epochs} --steps-per-epoch 2 --step-seconds 0.1"


@pytest.fixture(autouse=True)
def _clean_s3(sandbox: Sandbox, fleet_seed: SeedInfo) -> Iterator[None]:
    """The queue's durable copy lives in the session's bucket: none leaks into another test."""
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)

    def wipe() -> None:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])
        for item in listed:
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])

    wipe()
    yield
    wipe()


@pytest.fixture
def racing(svc: Services) -> Iterator[list[InlineWorker]]:
    """Two RQ workers polling the same queues at once, as two `worker` processes would."""
    pair = [InlineWorker(svc.redis), InlineWorker(svc.redis)]
    for w in pair:
        w.start(interval=0.05)
    yield pair
    for w in pair:
        w.stop()


def slash(svc: Services, slack: FakeSlack, text: str, user: str) -> dict[str, Any]:
    """A signed slash command through the real Bolt app; its ack's body."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user, channel=CHANNEL))
    assert resp.status == 200
    return json.loads(resp.body) if resp.body else {}


def until(what: str, check: Callable[[], object], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def live_run_id(svc: Services, iid: str) -> str:
    run = until("a live run", lambda: svc.runs.live_on(iid))
    until("it to run", lambda: (r := svc.runs.get(run.run_id)) is not None and r.state is RunState.RUNNING)
    return str(run.run_id)


def queue_of(svc: Services, iid: str) -> list[str]:
    return QueueStore(svc.redis).ids(iid)


def parents_of(slack: FakeSlack, run_id: str) -> list[Message]:
    return [m for m in slack.messages(CHANNEL) if m.thread_ts is None and f"({run_id})" in m.text]


def shows_queued(slack: FakeSlack, run_id: str) -> int | None:
    """How many runs the run's parent says are queued after it (None: it says nothing)."""
    found = re.search(r"(\d+) queued after it", json.dumps(parents_of(slack, run_id)[0].blocks))
    return int(found.group(1)) if found else None


def waiting(entry_id: str, iid: str, who: str, at: datetime, score: int) -> Entry:
    """A queued run as `add` would have checked it, for tests that queue directly."""
    return Entry(
        entry_id=entry_id,
        instance_id=iid,
        actor=Actor(user_id=who, channel_id=CHANNEL),
        command=TrainCommand(instance_id=iid, script=SCRIPT),
        ref_name="main",
        sha="",
        queued_at=at,
        score=score,
    )


def told(slack: FakeSlack, user: str) -> str:
    return "\n".join(m.text for m in slack.ephemerals(user)) + "\n".join(m.text for m in slack.messages(user))


def wait_queued(svc: Services, iid: str, n: int) -> list[str]:
    def ready() -> list[str] | None:
        ids = queue_of(svc, iid)
        return ids if len(ids) == n else None

    return list(until(f"{n} queued", ready))


def test_three_runs_queued_behind_a_live_one_start_in_order_once_each_with_two_workers_racing(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker]
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(12)}", ALICE)
    first = live_run_id(svc, iid)

    # Bob's plain `train` on the busy instance: who holds it, since when, and [Queue after it].
    busy = slash(svc, slack, f"train {iid} {SCRIPT} {SHORT}", BOB)
    assert f"is busy: <@{ALICE}> is training `{SCRIPT}` (run `{first}`)" in busy["text"], busy
    assert "Queue after it" in json.dumps(busy["blocks"])
    assert queue_of(svc, iid) == []  # nothing queued or started yet
    send_click(svc, slack, racing[0], click({"ts": "", "blocks": busy["blocks"]}, ActionId.QUEUE_AFTER, BOB))
    [bob] = wait_queued(svc, iid, 1)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", CAROL)
    carol = wait_queued(svc, iid, 2)[1]
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", DAVE)
    dave = wait_queued(svc, iid, 3)[2]

    # Bob hears where he stands; the live run's thread shows who is next, with a [Cancel].
    assert f"Queued run `{bob}`" in told(slack, BOB) and "position 1" in told(slack, BOB)
    parent = parents_of(slack, first)[0]
    thread = [m.text for m in slack.thread(CHANNEL, parent.ts)]
    assert any(f"next: <@{BOB}> `{SCRIPT}`" in t for t in thread), thread
    # `/runctl queue` lists them all, in order, with requester and position.
    slash(svc, slack, "queue", MALLORY)
    listing = until("the listing", lambda: [m.text for m in slack.ephemerals(MALLORY) if "live run" in m.text])[-1]
    assert listing.index(bob) < listing.index(carol) < listing.index(dave), listing
    assert f"1. `{bob}` <@{BOB}>" in listing and f"3. `{dave}` <@{DAVE}>" in listing
    slash(svc, slack, f"status {iid}", MALLORY)  # status shows the queue too
    shown = until("the status", lambda: [m.text for m in slack.ephemerals(MALLORY) if "Train lock" in m.text])[-1]
    assert "Queue (3):" in shown and shown.index(bob) < shown.index(carol) < shown.index(dave), shown
    until("the live run's parent to show the queue", lambda: shows_queued(slack, first) == 3)

    order = [first, bob, carol, dave]
    until("every queued run to finish", lambda: all((r := svc.runs.get(i)) and r.state.ended for i in order), 240)
    runs = [svc.runs.get(i) for i in order]
    assert all(r is not None and r.state is RunState.SUCCEEDED for r in runs), [r and r.state for r in runs]
    for before, after in itertools.pairwise(runs):
        assert before and after and before.ended_at and after.started_at
        assert after.started_at >= before.ended_at, "two queued runs never share the instance"
    for run_id, who in zip(order[1:], (BOB, CAROL, DAVE), strict=True):
        parent_msgs = parents_of(slack, run_id)
        assert len(parent_msgs) == 1, f"{run_id} started once: {[m.text for m in parent_msgs]}"
        assert f"<@{who}>" in text_of(parent_msgs[0])  # its requester is mentioned in its own message
    assert [shows_queued(slack, i) for i in order] == [None] * 4  # an ended run's parent no longer counts
    # The ended run's thread says who is next.
    thread = [m.text for m in slack.thread(CHANNEL, parent.ts)]
    assert any(f"Next on `{iid}`: <@{BOB}>'s `{SCRIPT}`" in t for t in thread), thread
    assert queue_of(svc, iid) == [] and QueueStore(svc.redis).starting(iid) is None


def test_two_workers_advancing_at_once_start_the_head_once(svc: Services, fleet_seed: SeedInfo) -> None:
    """The end event and a tick's fallback race: one transaction wins, one start job is queued."""
    iid = fleet_seed.instances["cpu-box"]
    now = datetime.now(UTC)
    store = QueueStore(svc.redis)
    for i, who in enumerate((BOB, CAROL)):
        store.add(waiting(f"q-race-{i}", iid, who, now, i), 3)
    gate = threading.Barrier(8)
    taken: list[str] = []

    def race() -> None:
        gate.wait()
        entry = queued.advance(svc, iid)
        if entry is not None:
            taken.append(entry.entry_id)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken == ["q-race-0"]
    starts = [j for j in queued_jobs(svc.redis) if j.func_name == JobPath.QUEUED_START.value]
    assert [j.args[0] for j in starts] == ["q-race-0"]
    assert store.ids(iid) == ["q-race-1"] and store.starting(iid) == "q-race-0"


def test_a_start_job_that_died_after_its_run_started_does_not_hold_the_queue(
    svc: Services, fleet_seed: SeedInfo
) -> None:
    """Its worker SIGKILLed between the run's start and the job's end (as in
    test_run_queue_processes): the "starting" marker it never cleared would hold the queue for
    an hour. The run's record shows the start happened: the next advance frees the instance."""
    iid = fleet_seed.instances["cpu-box"]
    now = datetime.now(UTC)
    store = QueueStore(svc.redis)
    for i, who in enumerate((BOB, CAROL)):
        store.add(waiting(f"q-orphan-{i}", iid, who, now, i), 3)
    assert queued.advance(svc, iid) is not None  # Bob's start job queued, the marker set
    run = svc.runs.create(
        Run(run_id="q-orphan-0", instance_id=iid, user_id=BOB, channel_id=CHANNEL, script=SCRIPT, started_at=now)
    )
    run.state, run.ended_at = RunState.SUCCEEDED, now  # ran and ended; its start job never settled
    svc.runs.save(run)
    for job in queued_jobs(svc.redis):
        job.delete()  # the job died with its worker

    taken = queued.advance(svc, iid)  # the run's end advancing the queue

    assert taken is not None and taken.entry_id == "q-orphan-1"
    assert store.starting(iid) == "q-orphan-1" and store.get("q-orphan-0") is None


def test_cancel_and_a_rights_revocation_between_queue_and_start(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker], tmp_path: Path
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    policy = tmp_path / "policy.toml"
    write_policy(svc, policy, '[roles]\nml = ["U0ALICE", "U0BOB", "U0CAROL"]\n[commands]\ntrain = ["ml", "admin"]\n')
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(10)}", ALICE)
    first = live_run_id(svc, iid)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    [bob] = wait_queued(svc, iid, 1)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", CAROL)
    carol = wait_queued(svc, iid, 2)[1]
    until("the live run's parent to show the queue", lambda: shows_queued(slack, first) == 2)

    # Mallory may neither click Carol's [Cancel] nor type it.
    slash(svc, slack, f"queue cancel {carol}", MALLORY)
    until("Mallory's refusal", lambda: "who queued" in told(slack, MALLORY))
    assert queue_of(svc, iid) == [bob, carol]
    # Bob's [Cancel], in the live run's thread.
    parent = parents_of(slack, first)[0]
    mine = next(m for m in slack.thread(CHANNEL, parent.ts) if bob in m.text and "next" in m.text)
    payload = {"ts": mine.ts, "blocks": mine.blocks, "text": mine.text}
    send_click(svc, slack, racing[0], click(payload, ActionId.QUEUE_CANCEL, BOB))
    until("Bob's cancel", lambda: queue_of(svc, iid) == [carol])
    until("Bob told", lambda: "was cancelled" in told(slack, BOB))  # said after the queue changed
    until("the parent to show one left", lambda: shows_queued(slack, first) == 1)
    assert f"Queued run `{bob}`" in told(slack, BOB)

    # Carol loses `train` before her turn: her run is not started, she is told, the queue moves on.
    write_policy(svc, policy, '[roles]\nml = ["U0ALICE", "U0BOB"]\n[commands]\ntrain = ["ml", "admin"]\n')
    until("the refusal", lambda: "was not started" in told(slack, CAROL), 120)
    assert f"Your queued run `{carol}`" in told(slack, CAROL) and "You can't `train`" in told(slack, CAROL)
    assert parents_of(slack, carol) == []
    until("an empty queue", lambda: not queue_of(svc, iid) and QueueStore(svc.redis).starting(iid) is None)
    assert svc.runs.get(bob) is None  # cancelled: never started


def test_terminate_lists_the_queue_and_cancels_it_each_requester_told(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker]
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(40)}", ALICE)
    live_run_id(svc, iid)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    [bob] = wait_queued(svc, iid, 1)

    slash(svc, slack, f"terminate {iid}", ADMIN)
    asked = until(
        "the confirmation", lambda: [m for m in slack.messages(CHANNEL) if "asks to *terminate" in text_of(m)]
    )
    shown = text_of(asked[-1])
    assert "1 queued run" in shown and bob in shown and f"<@{BOB}>" in shown, shown
    payload = {"ts": asked[-1].ts, "blocks": asked[-1].blocks, "text": asked[-1].text}
    send_click(svc, slack, racing[0], click(payload, ActionId.TERMINATE_CONFIRM, ADMIN))
    until("Bob told", lambda: "was cancelled" in told(slack, BOB), 120)
    assert f"`{iid}` was terminated by <@{ADMIN}>" in told(slack, BOB)
    assert queue_of(svc, iid) == [] and svc.runs.get(bob) is None


def test_autostop_never_stops_an_instance_whose_queue_is_not_empty(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Between one run's end and the next one's start the instance has no live run: the queue
    alone keeps it up."""
    iid = fleet_seed.instances["cpu-box"]
    t0 = datetime.now(UTC)
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": ALICE}])
    slash(svc, slack, f"autostop {iid} 30", ALICE)
    worker.drain()
    QueueStore(svc.redis).add(
        waiting("q-waits", iid, BOB, t0, 1),
        3,
    )
    for minutes in (25, 36, 50):
        moment = t0 + timedelta(minutes=minutes)
        svc.clock = lambda moment=moment: moment  # type: ignore[misc]
        sweep()
        assert not [j for j in queued_jobs(svc.redis) if j.func_name == JobPath.AUTOSTOP_STOP.value]
    said = stop_idle(iid)  # even asked directly, as a heads-up's [Stop now] or a stale job would
    assert "1 queued run waits for it" in said, said
    assert svc.fleet.get(iid).state == "running"


def test_redis_loss_with_two_runs_queued_both_still_start_in_order(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker]
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(30)}", ALICE)
    first = live_run_id(svc, iid)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    [bob] = wait_queued(svc, iid, 1)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", CAROL)
    carol = wait_queued(svc, iid, 2)[1]

    for w in racing:  # Redis loses everything (FLUSHDB of this test's db: FLUSHALL for runctl)
        w.stop()
    svc.redis.flushdb()
    for w in racing:
        w._stop.clear()
        w.start(interval=0.05)
    # The clock's reconcile heals: the live run is adopted again, the queue read back from S3.
    until("the queue restored", lambda: (reconcile(), queue_of(svc, iid) == [bob, carol])[1], 60)
    until(
        "both queued runs to finish",
        lambda: (reconcile(), all((r := svc.runs.get(i)) and r.state.ended for i in (bob, carol)))[1],
        240,
    )
    runs = [svc.runs.get(i) for i in (bob, carol)]
    assert all(r is not None and r.state is RunState.SUCCEEDED for r in runs)
    assert runs[0] and runs[1] and runs[0].ended_at and runs[1].started_at
    assert runs[1].started_at >= runs[0].ended_at
    assert len(parents_of(slack, bob)) == 1 and len(parents_of(slack, carol)) == 1
    del first


def test_a_stop_holds_the_queue_and_a_start_lets_it_go_on(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker]
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(40)}", ALICE)
    first = live_run_id(svc, iid)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    [bob] = wait_queued(svc, iid, 1)

    slash(svc, slack, f"stop {iid}", ALICE)  # the live run saves and ends; the instance stops
    summary = until("the stop summary", lambda: [m for m in slack.messages(CHANNEL) if "stopped *" in text_of(m)], 120)
    assert "1 queued run waits for it" in text_of(summary[-1]) and f"/runctl start {iid}" in text_of(summary[-1])
    assert svc.fleet.get(iid).state == "stopped"
    for _ in range(3):  # the fallbacks leave a held queue alone: nothing is tried on a stopped instance
        queued.fallback(svc)
    assert queue_of(svc, iid) == [bob] and "not started" not in told(slack, BOB)
    assert (r := svc.runs.get(first)) is not None and r.state.ended

    slash(svc, slack, f"start {iid}", ALICE)
    until("Bob's run", lambda: parents_of(slack, bob), 120)
    until("Bob's run to end", lambda: (r := svc.runs.get(bob)) is not None and r.state is RunState.SUCCEEDED, 120)


def test_an_instance_stopped_outside_runctl_fails_each_queued_start_and_each_requester_is_told(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker]
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(40)}", ALICE)
    first = live_run_id(svc, iid)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", CAROL)
    entries = wait_queued(svc, iid, 2)  # in the order two racing workers queued them

    svc.fleet.ec2.stop_instances(InstanceIds=[iid])  # the console, not runctl: the run is lost
    until("the live run lost", lambda: (r := svc.runs.get(first)) is not None and r.state.ended, 120)
    for who in (BOB, CAROL):
        until(f"{who} told", lambda: "was not started" in told(slack, who), 120)  # noqa: B023
        mine = [e for e in entries if f"Your queued run `{e}`" in told(slack, who)]
        assert len(mine) == 1 and "stopped" in told(slack, who)
    until("an empty queue", lambda: not queue_of(svc, iid) and QueueStore(svc.redis).starting(iid) is None)


def test_a_start_that_finds_the_instance_taken_goes_back_to_the_head_untold(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    """A plain `train` took the train lock between the head's take and its start job."""
    iid = fleet_seed.instances["cpu-box"]
    store = QueueStore(svc.redis)
    entry = Entry(
        entry_id="q-taken",
        instance_id=iid,
        actor=Actor(user_id=BOB, channel_id=CHANNEL),
        command=TrainCommand(instance_id=iid, script=SCRIPT),
        ref_name="main",
        sha="",
        queued_at=datetime.now(UTC),
        score=1,
    )
    store.add(entry, 3)
    assert queued.advance(svc, iid) is not None  # its start job is queued, not yet run
    other = Holder(run_id="r-plain", user_id=CAROL, script=SCRIPT, since=datetime.now(UTC))
    assert train_lock(svc.redis, iid).acquire(other.token())
    worker.drain()
    assert store.ids(iid) == ["q-taken"] and store.starting(iid) is None
    assert "not started" not in told(slack, BOB) and parents_of(slack, "q-taken") == []
    assert queued.advance(svc, iid) is None  # the lock's run ends first; its end starts this one


def test_a_person_may_have_three_queued_runs_unless_the_policy_says_otherwise(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, racing: list[InlineWorker], tmp_path: Path
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, f"train {iid} {SCRIPT} {long_run(60)}", ALICE)
    live_run_id(svc, iid)
    for n in range(1, 4):
        slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
        wait_queued(svc, iid, n)
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    until("the refusal", lambda: "You have 3 queued runs already" in told(slack, BOB))
    assert len(queue_of(svc, iid)) == 3
    write_policy(svc, tmp_path / "policy.toml", "queue_limit = 4\n")  # the policy file raises it
    slash(svc, slack, f"train {iid} {SCRIPT} --queue {SHORT}", BOB)
    wait_queued(svc, iid, 4)
    for entry_id in queue_of(svc, iid):  # tidy: the live run is long
        queued.cancel(svc, Actor(user_id=BOB, channel_id=CHANNEL), entry_id)
