"""Run events from someone holding a run's key (anyone root on its instance can read it from
`runs/<id>/run.sh`): keys of ended runs sign nothing, a flood of events never delays a
command, forged exit events cost one poll and never crowd out the real end, and numbers
that are not finite and bounded are refused. Through the real WSGI app, real Redis and RQ,
the sandbox's executing SSM (issue 32, F1 and F2)."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis as redis_mod
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry
from werkzeug.test import Client

from bot.web import wsgi
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.web import WebServer
from workers.errors import RunctlError
from workers.jobs import monitor
from workers.queueing import JobPath
from workers.remote import events as remote_events
from workers.remote.status import Snapshot
from workers.services import Services
from workers.settings import Settings
from workers.state import event_keys
from workers.state.runs import Run, RunState, RunStore

from .slack import command_body, sign
from .test_run_events import event_body, fingerprint, headers, replied, start_run

QUEUE_NAMES = ("runctl", "runctl-long", "runctl-events")  # every queue a job may wait on


@pytest.fixture
def client(settings: Settings, real_redis: redis_mod.Redis) -> Client:
    return Client(wsgi(settings, real_redis))


def live_run(
    redis: redis_mod.Redis,
    run_id: str,
    instance_id: str = "i-0abc",
    user_id: str = "U0ALICE",
    channel_id: str = "C0TRAIN",
) -> tuple[Run, str]:
    run = Run(
        run_id=run_id,
        instance_id=instance_id,
        user_id=user_id,
        channel_id=channel_id,
        script="train.py",
        state=RunState.RUNNING,
        wait=False,
    )
    RunStore(redis).create(run)
    RunStore(redis).save(run)
    return run, event_keys.issue(redis, run_id)


def send(client: Client, run_id: str, key: str, kind: str = "progress", **extra: Any) -> int:
    body = event_body(run_id, kind=kind, **extra)
    return int(client.post("/runctl/events", data=body, headers=headers(run_id, body, key)).status_code)


def waiting_jobs(redis: redis_mod.Redis) -> int:
    total = 0
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=redis)
        total += int(queue.count) + int(ScheduledJobRegistry(queue=queue).count)  # type: ignore[no-untyped-call]
    return total


def finished_jobs(redis: redis_mod.Redis) -> list[Job]:
    jobs: list[Job] = []
    for name in QUEUE_NAMES:
        registry = FinishedJobRegistry(queue=Queue(name, connection=redis))
        jobs += [Job.fetch(i, connection=redis) for i in registry.get_job_ids()]
    return jobs


# --- F1: keys that outlive their runs; a flood that jumps the queue ---------------------------


def test_ended_runs_keys_are_refused_and_nothing_is_queued(
    client: Client, svc: Services, real_redis: redis_mod.Redis
) -> None:
    channels = ("C0TRAIN", "C0OPS", "C0ENV", "C0RANDOM")
    keys: dict[str, str] = {}
    for i in range(40):
        run, key = live_run(real_redis, f"r-ended-{i:02d}", instance_id=f"i-0{i % 4:016d}", channel_id=channels[i % 4])
        keys[run.run_id] = key
    runs = list(keys)
    for run_id in runs[:2]:  # the monitor saw the training exit
        found = svc.runs.get(run_id)
        assert found is not None
        monitor.finish(svc, found, Snapshot(exit_code=0))
    for run_id in runs[2:4]:  # the monitor lost the instance
        found = svc.runs.get(run_id)
        assert found is not None
        monitor.lost(svc, found, RunctlError("The instance is gone."))
    for run_id in runs[4:]:  # ended as a stop flow leaves a run: no end claimed by the monitor
        found = svc.runs.get(run_id)
        assert found is not None
        found.state, found.ended_by = RunState.STOPPED, "stop"
        svc.runs.save(found)
    ttls = {r: real_redis.ttl(f"runctl:events:key:{r}") for r in runs[4:]}
    before = fingerprint(real_redis)

    answers = Counter(
        send(client, run_id, keys[run_id], kind="exit" if n == 11 else "progress", progress={"epoch": n})
        for run_id in runs
        for n in range(12)
    )
    assert answers == Counter({401: 480})
    assert waiting_jobs(real_redis) == 0
    assert fingerprint(real_redis) == before  # nothing written: no nonce, no rate entry, no renewed key
    assert all(real_redis.ttl(f"runctl:events:key:{r}") <= ttls[r] for r in runs[4:])
    assert [event_keys.get(real_redis, r) for r in runs[:4]] == [None] * 4  # revoked when the end was claimed


def test_a_flood_of_events_never_delays_a_queued_command_past_one_job(
    client: Client, svc: Services, real_redis: redis_mod.Redis, fleet_seed: SeedInfo, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]

    def status() -> None:
        body = command_body(f"status {iid}")
        assert client.post("/slack/events", data=body, headers=sign(body)).status_code == 200

    status()  # queued before the flood
    runs = [
        live_run(real_redis, f"r-flood-{i:02d}", instance_id=f"i-0{i % 8:016d}", user_id=f"U0USER{i % 4}")
        for i in range(40)
    ]
    answers = Counter(
        send(client, run.run_id, key, progress={"epoch": n, "total_epochs": 9}) for n in range(3) for run, key in runs
    )
    assert answers[202] >= 40
    status()  # and one after it
    worker.drain()

    started = sorted(finished_jobs(real_redis), key=lambda j: j.started_at.timestamp() if j.started_at else 0.0)
    order = [j.func_name for j in started]
    assert order.count(JobPath.STATUS.value) == 2
    assert order.count(JobPath.RUN_EVENT.value) >= 1
    for at, name in enumerate(order):
        if name == JobPath.STATUS.value:  # each waited for one event job at most
            assert order[:at].count(JobPath.RUN_EVENT.value) <= 1, f"{order[:at].count(JobPath.RUN_EVENT.value)} before"


def test_progress_caps_per_instance_user_and_overall(
    client: Client, settings: Settings, real_redis: redis_mod.Redis
) -> None:
    settings.RUNCTL_EVENTS_PER_MINUTE = 3
    settings.RUNCTL_EVENTS_INSTANCE_PER_MINUTE = 4
    settings.RUNCTL_EVENTS_USER_PER_MINUTE = 6
    settings.RUNCTL_EVENTS_TOTAL_PER_MINUTE = 8
    a1, a2 = (live_run(real_redis, f"r-cap-a{n}", "i-0aaa", "U0ONE") for n in (1, 2))
    b1 = live_run(real_redis, "r-cap-b1", "i-0bbb", "U0ONE")
    c1 = live_run(real_redis, "r-cap-c1", "i-0ccc", "U0TWO")
    d1 = live_run(real_redis, "r-cap-d1", "i-0ddd", "U0THREE")
    over: list[str] = []

    def burst(run: tuple[Run, str], n: int) -> list[int]:
        codes = []
        for _ in range(n):
            body = event_body(run[0].run_id, progress={"epoch": 1})
            answer = client.post("/runctl/events", data=body, headers=headers(run[0].run_id, body, run[1]))
            codes.append(answer.status_code)
            if answer.status_code == 429:
                over.append(answer.get_data(as_text=True))
        return codes

    assert burst(a1, 4) == [202, 202, 202, 429]  # the run's own budget
    assert burst(a2, 2) == [202, 429]  # the instance's
    assert burst(b1, 3) == [202, 202, 429]  # the user's
    assert burst(c1, 3) == [202, 202, 429]  # everyone's
    assert burst(d1, 1) == [429]
    assert [text.split(" (")[0] for text in over] == [
        "too many events for this run",
        "too many events from this instance's runs",
        "too many events from this user's runs",
        "too many events from all runs",
        "too many events from all runs",
    ]
    for run, key in (a1, d1):  # exits have their own budget: a run's end still gets through
        assert send(client, run.run_id, key, kind="exit") == 202


# --- F2: forged exit events ---------------------------------------------------------------------


def test_progress_noise_never_pushes_out_the_exit(
    client: Client, settings: Settings, real_redis: redis_mod.Redis
) -> None:
    run, key = live_run(real_redis, "r-noisy")
    codes = [send(client, run.run_id, key, progress={"epoch": 1}) for _ in range(settings.RUNCTL_EVENTS_PER_MINUTE + 3)]
    assert codes[-3:] == [429] * 3
    assert send(client, run.run_id, key, kind="exit") == 202
    assert real_redis.hget(f"runctl:events:pending:{run.run_id}", "exit") == b"1"


class Recorder:
    """The WSGI app, noting the kind and answer of every run event posted to it."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.answers: list[tuple[str, str, int]] = []  # run id, kind, status
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/runctl/events":
            return self.app(environ, start_response)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        try:
            kind = str(json.loads(body).get("kind"))
        except (ValueError, AttributeError):
            kind = "?"
        run_id = str(environ.get("HTTP_X_RUNCTL_RUN"))

        def noted(status: str, *args: Any) -> Any:
            with self.lock:
                self.answers.append((run_id, kind, int(status.split()[0])))
            return start_response(status, *args)

        return self.app(environ, noted)


def test_forged_exit_events_cost_one_poll_and_the_real_end_is_told_by_its_event(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1.0, 600.0
    sends: list[str] = []
    svc.fleet.ssm.meta.events.register("before-call.ssm.SendCommand", lambda **_: sends.append("send"))
    recorder = Recorder(wsgi(svc.settings, svc.redis))
    iid = fleet_seed.instances["gpu-box-1"]
    with WebServer(recorder) as web:
        svc.settings.RUNCTL_EVENTS_URL = web.events_url
        run_id = start_run(svc, iid, "--epochs", "3", "--steps-per-epoch", "8", "--step-seconds", "0.25")  # ~6 s
        key = event_keys.get(svc.redis, run_id)
        assert key is not None  # as anyone root on the instance reads it from runs/<id>/run.sh
        client = Client(recorder)
        before = len(sends)
        forged = [send(client, run_id, key, kind="exit") for _ in range(12)]
        assert forged.count(202) >= 11
        InlineWorker(svc.redis).work()  # what is queued; nothing scheduled (the monitor's ticks) runs
        assert len(sends) - before <= 1
        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.RUNNING  # the forged exits found it alive

        # Only run events from here: the monitor's ticks are never promoted, so the end can
        # reach Slack only through the wrapper's exit event.
        events_only = InlineWorker(svc.redis, ("runctl-events",))
        with events_only:
            events_only.start(interval=0.05)
            slack.wait_for(lambda: replied(slack, run_id), timeout=60)
    wrapper_exits = [code for rid, kind, code in recorder.answers[len(forged) :] if rid == run_id and kind == "exit"]
    assert wrapper_exits[:1] == [202]
    assert not any(j.func_name == JobPath.MONITOR_TICK.value for j in finished_jobs(svc.redis))
    final = svc.runs.get(run_id)
    assert final is not None and final.state is RunState.SUCCEEDED


# --- event numbers ------------------------------------------------------------------------------


def raw_event(run_id: str, progress: str) -> bytes:
    nonce = secrets.token_hex(16)
    return (
        f'{{"run_id":"{run_id}","kind":"progress","ts":{int(time.time())},"nonce":"{nonce}","progress":{progress}}}'
    ).encode()


def test_numbers_not_finite_or_too_large_are_refused_and_crash_no_job(
    client: Client, svc: Services, real_redis: redis_mod.Redis, worker: InlineWorker
) -> None:
    run, key = live_run(real_redis, "r-numbers")
    before = fingerprint(real_redis)
    for progress in (
        '{"eta_seconds":Infinity}',
        '{"metrics":{"loss":NaN}}',
        '{"epoch":-Infinity}',
        '{"eta_seconds":1e400}',
        '{"step":' + "9" * 400 + "}",
        '{"metrics":[1,2]}',
    ):
        body = raw_event(run.run_id, progress)
        answer = client.post("/runctl/events", data=body, headers=headers(run.run_id, body, key))
        assert answer.status_code == 400, progress
    assert fingerprint(real_redis) == before

    # A job an older version queued with such a number: ignored, not crashed.
    Queue("runctl", connection=real_redis).enqueue(
        JobPath.RUN_EVENT.value, run.run_id, "progress", {"epoch": 1, "eta_seconds": float("inf")}
    )
    worker.drain()
    failed = FailedJobRegistry(queue=Queue("runctl", connection=real_redis))
    assert failed.count == 0
    (done,) = finished_jobs(real_redis)
    assert done.return_value() == "progress: ignored: no progress"


def test_the_wrapper_forwards_a_diverged_runs_progress_without_its_nan(
    settings: Settings, real_redis: redis_mod.Redis, tmp_path: Any
) -> None:
    run, key = live_run(real_redis, "r-diverged")
    (tmp_path / "progress.json").write_text('{"epoch": 2, "metrics": {"loss": NaN, "acc": 0.5}, "eta_seconds": 1e400}')
    with WebServer(wsgi(settings, real_redis)) as web:
        subprocess.run(
            [sys.executable, "-c", remote_events._PY_SEND, web.events_url, run.run_id, "progress", str(tmp_path)],
            input=key + "\n",
            text=True,
            check=True,
            timeout=30,
        )
    stored = real_redis.hget(f"runctl:events:pending:{run.run_id}", "progress")
    assert stored is not None  # accepted (202), not refused
    assert json.loads(stored) == {"epoch": 2, "metrics": {"loss": None, "acc": 0.5}, "eta_seconds": None}
