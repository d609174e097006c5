"""The job funnel, through RQ and the signed front door: every job tells its person about an
unexpected failure and audits it, and every job obeys the policy as it is when it acts,
not as it was when the request was queued."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import TimeoutError as RedisTimeout
from rq import Queue
from rq.job import Job as RqJob
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.commands import (
    Actor,
    AuditCommand,
    AutostopCommand,
    CheckpointsCommand,
    Command,
    LogsCommand,
    ResourcesCommand,
    StartCommand,
    StatusCommand,
    StopCommand,
    TerminateCommand,
    TrainCommand,
)
from workers.jobs import funnel
from workers.queueing import QUEUES, SPECS, CommandArgs, JobPath
from workers.queueing import enqueue_command as enqueue
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.polls import schedule
from workers.state.runs import Run, RunState
from workers.state.warnings import Kind

from .conftest import TOKEN
from .slack import click, command
from .test_lifecycle import as_dict, posted, send_click

CHANNEL = "C0TRAIN"
ALICE = Actor(user_id="U0ALICE", channel_id=CHANNEL, text="…")
ADMIN = Actor(user_id="U0ADMIN", channel_id=CHANNEL)
ACTIONS = ("train", "status", "stop", "start", "terminate", "resources", "checkpoints", "logs", "autostop")
ALLOWED = '[roles]\nml = ["U0ALICE"]\n[commands]\n' + "".join(f'{a} = ["ml", "admin"]\n' for a in ACTIONS)
REVOKED = {
    "role": ALLOWED.replace('ml = ["U0ALICE"]', "ml = []"),
    "channel": 'channels = ["C0ELSEWHERE"]\n' + ALLOWED,
}


def write_policy(svc: Services, path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time_ns() + 1_000_000  # a same-second rewrite must still look changed
    os.utime(path, ns=(stamp, stamp))
    svc.settings.RUNCTL_POLICY_FILE = path  # the app and the worker share this Settings object


@pytest.fixture
def policy_file(svc: Services, tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    write_policy(svc, path, ALLOWED)
    return path


def seen_by(slack: FakeSlack, user: str) -> list[str]:
    """Everything `user` can read: ephemerals to them, DMs, and channel messages naming them."""
    mentioned = [m.text for m in slack.messages(CHANNEL) if f"<@{user}>" in m.text]
    return [e.text for e in slack.ephemerals(user)] + [m.text for m in slack.messages(user)] + mentioned


def newest_audit(svc: Services, user: str) -> audit.Record:
    return next(r for r in audit.newest(svc.redis, 50) if r.user == user and r.source == "worker")


def break_aws(svc: Services, service: str = "ec2") -> None:
    """Every call to `service` fails with an error our AWS boundary does not know."""

    def boom(**_: Any) -> None:
        raise KeyError("Reservations")  # as a response of an unexpected shape would

    getattr(svc.fleet, service).meta.events.register(f"before-call.{service}", boom)


def failed_jobs(svc: Services) -> list[RqJob]:
    from rq.registry import FailedJobRegistry

    ids = [i for name in QUEUES for i in FailedJobRegistry(queue=Queue(name, connection=svc.redis)).get_job_ids()]
    return [RqJob.fetch(i, connection=svc.redis) for i in ids]


def waiting(svc: Services) -> int:
    """Jobs waiting on the quick and the long queue."""
    return sum(int(Queue(name, connection=svc.redis).count) for name in QUEUES)


# --- an unexpected exception reaches the person and the audit trail ------------------------

Setup = Callable[[Services, SeedInfo, FakeSlack, InlineWorker, pytest.MonkeyPatch], tuple[Actor, str]]


def _command(
    make: Callable[[str], Command], box: str = "gpu-box-1", who: Actor = ALICE, run_id: str | None = None
) -> Setup:
    def setup(
        svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
    ) -> tuple[Actor, str]:
        cmd = make(seed.instances[box])
        break_aws(svc)
        enqueue(svc.queue, cmd, who, run_id)
        iid = getattr(cmd, "instance_id", None)
        return who, f"/runctl status {iid}" if iid else "/runctl resources"

    return setup


def _audit_job(
    svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
) -> tuple[Actor, str]:
    def timeout(*_: Any, **__: Any) -> None:
        raise RedisTimeout("Timeout reading from socket")

    mp.setattr(svc.redis, "xrevrange", timeout)  # the audit stream read times out
    enqueue(svc.queue, AuditCommand(), ADMIN)
    return ADMIN, "/runctl resources"


def _terminate_click(
    svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
) -> tuple[Actor, str]:
    iid = seed.instances["cpu-box"]
    enqueue(svc.queue, TerminateCommand(instance_id=iid), ALICE)
    worker.drain()
    m = posted(slack, "asks to *terminate")
    break_aws(svc)
    send_click(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ALICE"))
    return ALICE, f"/runctl status {iid}"


def _resume_click(
    svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
) -> tuple[Actor, str]:
    svc.redis.set("runctl:run:r-old", '{"run_id": "r-old", "written_by": "a newer runctl"}')
    svc.queue.enqueue(JobPath.RESUME.value, "r-old", ALICE.model_dump(mode="json"), "1.000")
    return ALICE, "/runctl resources"


def _unreadable_run_click(path: JobPath) -> Setup:
    """A click on a run whose record another version wrote."""

    def setup(
        svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
    ) -> tuple[Actor, str]:
        svc.redis.set("runctl:run:r-old", '{"run_id": "r-old", "written_by": "a newer runctl"}')
        svc.queue.enqueue(path.value, "r-old", ALICE.model_dump(mode="json"))
        return ALICE, "/runctl resources"

    return setup


def _autostop_click(path: JobPath) -> Setup:
    def setup(
        svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
    ) -> tuple[Actor, str]:
        iid = seed.instances["gpu-box-1"]
        break_aws(svc)
        svc.redis.hset("runctl:autostop", iid, '{"instance_id": "' + iid + '"}')  # written by another version
        svc.queue.enqueue(path.value, iid, ALICE.model_dump(mode="json"), "1.000")
        return ALICE, f"/runctl status {iid}"

    return setup


def _warning_click(path: JobPath) -> Setup:
    def setup(
        svc: Services, seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, mp: pytest.MonkeyPatch
    ) -> tuple[Actor, str]:
        iid = seed.instances["gpu-box-1"]
        if path is JobPath.WARNING_STOP_NOW:
            break_aws(svc)
            svc.queue.enqueue(path.value, iid, Kind.UPTIME.value, ALICE.model_dump(mode="json"))
        else:  # the warning's record is unreadable (written by another version)
            svc.redis.set(f"runctl:warn:{iid}:uptime", '{"kind": "uptime"}')
            svc.queue.enqueue(
                path.value, iid, Kind.UPTIME.value, ALICE.user_id, *([""] if path is JobPath.WARNING_KEEP else [])
            )
        return ALICE, f"/runctl status {iid}"

    return setup


CRASHES: dict[str, Setup] = {
    "train": _command(lambda i: TrainCommand(instance_id=i, script="train_with_checkpoints.py"), run_id="r-crash"),
    "status": _command(lambda i: StatusCommand(instance_id=i)),
    "stop": _command(lambda i: StopCommand(instance_id=i)),
    "start": _command(lambda i: StartCommand(instance_id=i), "old-box"),
    "terminate": _command(lambda i: TerminateCommand(instance_id=i)),
    "resources": _command(lambda i: ResourcesCommand()),
    "checkpoints": _command(lambda i: CheckpointsCommand(instance_id=i)),
    "logs": _command(lambda i: LogsCommand(instance_id=i)),
    "autostop": _command(lambda i: AutostopCommand(instance_id=i, minutes=30)),
    "audit": _audit_job,
    "terminate click": _terminate_click,
    "resume click": _resume_click,
    "stop now click": _warning_click(JobPath.WARNING_STOP_NOW),
    "snooze click": _warning_click(JobPath.WARNING_SNOOZE),
    "keep click": _warning_click(JobPath.WARNING_KEEP),
    "full log click": _unreadable_run_click(JobPath.FULL_LOG),
    "autostop keep click": _autostop_click(JobPath.AUTOSTOP_KEEP),
    "autostop stop now click": _autostop_click(JobPath.AUTOSTOP_STOP_NOW),
}


def test_every_job_path_is_a_funnel_entry() -> None:
    """What RQ can run is exactly what the funnel wrapped: no job path bypasses it."""
    for path in JobPath:
        module, name = path.value.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) in funnel.ENTRIES, path


def test_a_job_queued_at_a_path_of_the_release_before_the_split_still_runs(
    svc: Services, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Stop, start, terminate, the confirmation's clicks and [Resume training] left
    workers/jobs/lifecycle.py; RQ stores import paths, so a job queued there before still runs its flow."""
    for name in ("stop", "start", "terminate", "confirm_click", "resume"):
        assert getattr(importlib.import_module("workers.jobs.lifecycle"), name) in funnel.ENTRIES, name
    svc.queue.enqueue("workers.jobs.lifecycle.resume", "r-gone", ALICE.model_dump(mode="json"), "1.000")
    worker.drain()
    assert any("Run `r-gone` is no longer known to runctl" in text for text in seen_by(slack, ALICE.user_id))


@pytest.mark.parametrize("job", list(CRASHES))
def _decorator(path: JobPath) -> ast.Call:
    module, name = path.value.rsplit(".", 1)
    tree = ast.parse(Path(importlib.import_module(module).__file__ or "").read_text())
    flow = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return next(d for d in flow.decorator_list if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute))


def test_every_queued_path_gives_its_job_the_arguments_and_the_actor_where_the_funnel_reads_them() -> None:
    """`queueing.enqueue` lays a payload out as the job function's arguments and puts the actor
    where the funnel's wrapper (`click(what, actor_at)`, `command`) reads it; a system job gets none."""
    for path, spec in SPECS.items():
        call = _decorator(path)
        wrapper = call.func.attr  # type: ignore[attr-defined]
        module, name = path.value.rsplit(".", 1)
        flow = inspect.signature(getattr(importlib.import_module(module), name).__wrapped__)
        takes = [p for p in flow.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        if wrapper == "system":  # a person only in `then(run_id, raw_actor)`: the requester it acts for
            names = [p.name for p in takes]
            if spec.actor_at is not None:
                assert names.pop(spec.actor_at) == "raw_actor", path
            assert names[: len(spec.payload.model_fields)] == list(spec.payload.model_fields), path
        elif wrapper == "command":
            assert spec.actor_at == 1 and spec.payload is CommandArgs, path
        else:
            assert wrapper == "click" and isinstance(call.args[1], ast.Constant), path
            assert spec.actor_at == call.args[1].value, path
            assert [p.name for p in takes[1:]] == list(spec.payload.model_fields), path  # after `job`


@pytest.mark.parametrize("job", list(CRASHES))
def test_an_unexpected_exception_reaches_the_person_and_the_audit_trail(
    job: str,
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    policy_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    who, check = CRASHES[job](svc, fleet_seed, slack, worker, monkeypatch)
    worker.drain()
    monkeypatch.undo()

    told = [t for t in seen_by(slack, who.user_id) if "internal error" in t]
    assert told, seen_by(slack, who.user_id)
    assert f"`{check}`" in told[-1], told[-1]
    entry = newest_audit(svc, who.user_id)
    assert entry.decision == "failed" and entry.outcome.startswith("internal error: "), entry
    assert [j.func_name for j in failed_jobs(svc)], "RQ keeps the crashed job in its failed registry"


def test_a_crashed_train_fails_its_run_in_its_own_thread(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    policy_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    CRASHES["train"](svc, fleet_seed, slack, worker, monkeypatch)
    worker.drain()
    run = svc.runs.get("r-crash")
    assert run is not None and run.state is RunState.FAILED and run.error is not None
    assert "internal error" in run.error.what
    reply = slack.thread(CHANNEL, run.message_ts or "")
    assert reply and "<@U0ALICE>" in reply[-1].text and "internal error" in reply[-1].text


@pytest.mark.parametrize("name", ["sweep", "digest", "monitor tick"])
def test_a_crashed_clock_or_monitor_job_is_audited_and_left_to_rq(
    name: str, svc: Services, fleet_seed: SeedInfo, worker: InlineWorker
) -> None:
    if name == "monitor tick":
        iid = fleet_seed.instances["gpu-box-1"]
        svc.runs.save(
            svc.runs.create(
                Run(
                    run_id="r-due",
                    instance_id=iid,
                    user_id="U0ALICE",
                    channel_id=CHANNEL,
                    script="train.py",
                    state=RunState.RUNNING,
                )
            )
        )
        break_aws(svc, "ssm")
        schedule(svc, "r-due", timedelta(0))
    else:
        break_aws(svc)
        svc.queue.enqueue({"sweep": JobPath.SWEEP, "digest": JobPath.DIGEST}[name].value)
    worker.promote(everything=True)
    worker.work()  # once: a crashed tick reschedules its runs, so draining would never end

    entry = audit.newest(svc.redis, 1)[0]
    assert (entry.user, entry.text, entry.decision, entry.outcome) == (
        "runctl",
        name,
        "failed",
        "internal error: KeyError",
    )
    assert failed_jobs(svc)
    if name == "monitor tick":  # the run it had claimed is still followed
        assert svc.redis.zscore("runctl:monitor:due", "r-due") is not None


# --- the policy as it is when the job acts -----------------------------------------------

# command text, the seeded instance it names, and what "nothing happened" looks like
ACTS: dict[str, tuple[str, str]] = {
    "stop": ("stop {iid}", "gpu-box-1"),
    "start": ("start {iid}", "old-box"),
    "terminate": ("terminate {iid}", "cpu-box"),
    "resources": ("resources", "gpu-box-1"),
    "checkpoints": ("checkpoints {iid}", "gpu-box-1"),
}


@pytest.mark.parametrize("revoked", list(REVOKED))
@pytest.mark.parametrize("name", list(ACTS))
def test_a_policy_change_between_queueing_and_acting_is_honoured(
    name: str,
    revoked: str,
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    policy_file: Path,
) -> None:
    text, box = ACTS[name]
    iid = fleet_seed.instances[box]
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    ack = app.dispatch(command(text.format(iid=iid), user="U0ALICE", channel=CHANNEL))
    assert ack.status == 200 and ("queued" in ack.body or ack.body == ""), ack.body
    assert waiting(svc) == 1
    before = svc.fleet.get(iid).state
    write_policy(svc, policy_file, REVOKED[revoked])

    worker.drain()

    refusals = [e.text for e in slack.ephemerals("U0ALICE") if ":warning:" in e.text]
    assert refusals and ("You can't" in refusals[-1] or "this channel" in refusals[-1]), refusals
    assert svc.fleet.get(iid).state == before
    assert not [m for m in slack.messages(CHANNEL) if "U0ALICE" in m.text or "Fleet" in m.text]
    assert len(slack.ephemerals("U0ALICE")) == 1  # the refusal, and no listing or answer
    entry = newest_audit(svc, "U0ALICE")
    assert entry.decision == "refused" and entry.text == f"/runctl {text.format(iid=iid)}", entry


@pytest.mark.parametrize("revoked", list(REVOKED))
def test_a_terminate_click_obeys_the_policy_at_the_time_it_acts(
    revoked: str, svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, policy_file: Path
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    enqueue(svc.queue, TerminateCommand(instance_id=iid), ALICE)
    worker.drain()
    m = posted(slack, "asks to *terminate")
    calls: list[int] = []
    svc.fleet.ec2.meta.events.register("before-call.ec2.TerminateInstances", lambda **_: calls.append(1))
    send_click(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ALICE"))
    assert waiting(svc) == 1  # the front door let the click in
    write_policy(svc, policy_file, REVOKED[revoked])

    worker.drain()

    assert calls == [] and svc.fleet.get(iid).state == "running"
    assert any("You can't `terminate`" in e.text or "this channel" in e.text for e in slack.ephemerals("U0ALICE"))
    still = next(x for x in slack.messages(CHANNEL) if x.ts == m.ts)
    assert any(b.get("type") == "actions" for b in still.blocks), "the buttons stay for someone allowed"
    assert newest_audit(svc, "U0ALICE").decision == "refused"
