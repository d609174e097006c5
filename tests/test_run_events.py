"""Run events (`/runctl/events`): a forged, stale or replayed event changes nothing; an
exit event gets the run's end into its thread without waiting for a poll; with the event
path blocked, polling still reports the run. Real Redis, the real WSGI app, moto + the
executing-SSM shim (its shells POST to the app on 127.0.0.1, as an instance would)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_mod
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from werkzeug.test import Client

from bot.web import wsgi
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.web import WebServer
from workers.commands import Actor, TrainCommand
from workers.jobs.train import train
from workers.queueing import EVENTS_QUEUE, JobPath
from workers.services import Services
from workers.settings import Settings
from workers.state import event_keys, polls
from workers.state.runs import Run, RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


def event_body(run_id: str, kind: str = "progress", ts: int | None = None, **extra: Any) -> bytes:
    event = {
        "run_id": run_id,
        "kind": kind,
        "ts": int(time.time()) if ts is None else ts,
        "nonce": secrets.token_hex(16),
        **extra,
    }
    return json.dumps(event).encode()


def headers(run_id: str, body: bytes, key: str) -> dict[str, str]:
    sig = "v1=" + hmac.new(key.encode(), b"v1:" + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Runctl-Run": run_id, "X-Runctl-Signature": sig}


def queued_events(redis: redis_mod.Redis) -> list[Any]:
    return [j for j in Queue(EVENTS_QUEUE, connection=redis).jobs if j.func_name == JobPath.RUN_EVENT.value]


def fingerprint(redis: redis_mod.Redis) -> dict[bytes | str, Any]:
    """Every key and its value: what a refused event must leave as it was."""
    out: dict[bytes | str, Any] = {}
    for key in sorted(redis.keys("*")):
        kind = redis.type(key)
        out[key] = redis.get(key) if kind == b"string" else (kind, redis.dump(key))
    return out


def ran_events(redis: redis_mod.Redis) -> list[str]:
    """What each finished run-event job did: "exit: polled", "progress: progress shown", ..."""
    registry = FinishedJobRegistry(queue=Queue(EVENTS_QUEUE, connection=redis))
    jobs = (Job.fetch(i, connection=redis) for i in registry.get_job_ids())
    return [str(j.return_value()) for j in jobs if j.func_name == JobPath.RUN_EVENT.value]


@pytest.fixture
def client(settings: Settings, real_redis: redis_mod.Redis) -> Client:
    return Client(wsgi(settings, real_redis))


@pytest.fixture
def live(real_redis: redis_mod.Redis) -> tuple[Run, str]:
    run = Run(
        run_id="r-events-1",
        instance_id="i-0abc",
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.RUNNING,
        message_ts="1.000",
    )
    from workers.state.runs import RunStore

    RunStore(real_redis).create(run)
    return run, event_keys.issue(real_redis, run.run_id)


def test_forged_stale_and_replayed_events_are_refused_with_no_effect(
    client: Client, real_redis: redis_mod.Redis, live: tuple[Run, str]
) -> None:
    run, key = live
    before = fingerprint(real_redis)
    progress = {"epoch": 9, "total_epochs": 10}
    refused = {
        "forged": (body := event_body(run.run_id, progress=progress), headers(run.run_id, body, "0" * 64)),
        "stale": (body := event_body(run.run_id, ts=int(time.time()) - 301), headers(run.run_id, body, key)),
        "from the future": (body := event_body(run.run_id, ts=int(time.time()) + 301), headers(run.run_id, body, key)),
        "another run's body": (body := event_body("r-other"), headers(run.run_id, body, key)),
        "unknown run": (body := event_body("r-nobody"), headers("r-nobody", body, key)),
        "unsigned": (body := event_body(run.run_id), {"X-Runctl-Run": run.run_id}),
    }
    for name, (body, head) in refused.items():
        answer = client.post("/runctl/events", data=body, headers=head)
        assert answer.status_code == 401, name
    assert fingerprint(real_redis) == before  # nothing written: no nonce, no rate entry, no job

    body = event_body(run.run_id, kind="exit")
    assert client.post("/runctl/events", data=body, headers=headers(run.run_id, body, key)).status_code == 202
    assert [j.args for j in queued_events(real_redis)] == [(run.run_id,)]
    assert real_redis.hgetall(f"runctl:events:pending:{run.run_id}") == {b"exit": b"1"}
    after_first = fingerprint(real_redis)
    replay = client.post("/runctl/events", data=body, headers=headers(run.run_id, body, key))
    assert replay.status_code == 401
    assert len(queued_events(real_redis)) == 1
    assert fingerprint(real_redis) == after_first


def test_oversized_and_too_frequent_events_are_refused(
    client: Client, settings: Settings, real_redis: redis_mod.Redis, live: tuple[Run, str]
) -> None:
    run, key = live
    big = event_body(run.run_id, progress={"pad": "x" * 9000})
    assert client.post("/runctl/events", data=big, headers=headers(run.run_id, big, key)).status_code == 413
    answers = []
    for _ in range(settings.RUNCTL_EVENTS_PER_MINUTE + 2):
        body = event_body(run.run_id)
        answers.append(client.post("/runctl/events", data=body, headers=headers(run.run_id, body, key)).status_code)
    assert answers == [202] * settings.RUNCTL_EVENTS_PER_MINUTE + [429, 429]
    assert len(queued_events(real_redis)) == 1  # one job per run waits at a time: the others merged into it


@pytest.fixture
def web(settings: Settings, real_redis: redis_mod.Redis) -> Iterator[WebServer]:
    with WebServer(wsgi(settings, real_redis)) as server:
        yield server


def start_run(svc: Services, iid: str, *args: str) -> str:
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    return run_id


def replied(slack: FakeSlack, run_id: str) -> bool:
    return any(f"run `{run_id}` finished (exit 0)" in m.text for m in slack.messages("C0TRAIN"))


SHORT = ("--epochs", "2", "--steps-per-epoch", "4", "--step-seconds", "0.25")  # about 2 s of training


def test_open_event_path_replies_without_waiting_for_a_poll(
    svc: Services, web: WebServer, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    svc.settings.RUNCTL_EVENTS_URL = web.events_url
    svc.settings.RUNCTL_POLL_MIN_SECONDS = svc.settings.RUNCTL_POLL_MAX_SECONDS = 600  # no poll after the first
    iid = fleet_seed.instances["gpu-box-1"]
    with worker:
        worker.start(interval=0.05)
        run_id = start_run(svc, iid, *SHORT)
        started = time.monotonic()
        slack.wait_for(lambda: replied(slack, run_id), timeout=30)
        took = time.monotonic() - started
    due = svc.redis.zscore(polls.DUE, run_id)
    assert due is None  # finished: not waiting for a poll
    assert "exit: polled" in ran_events(svc.redis)
    assert took < 30  # the next poll would have been 600 s away
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED
    run_sh = sandbox.instance_dir(iid) / "runs" / run_id / "run.sh"
    assert oct(os.stat(run_sh).st_mode & 0o777) == "0o600"  # it holds the run's key


def test_blocked_event_path_is_reported_by_polling(
    svc: Services, web: WebServer, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    svc.settings.RUNCTL_EVENTS_URL = web.blocked_url  # the instance cannot reach the bot
    iid = fleet_seed.instances["gpu-box-1"]
    with worker:
        worker.start(interval=0.05)
        run_id = start_run(svc, iid, *SHORT)
        slack.wait_for(lambda: replied(slack, run_id), timeout=60)
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED and run.exit_code == 0
    assert ran_events(svc.redis) == []  # reported by the monitor's polls: no event arrived
