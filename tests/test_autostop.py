"""`train --then stop` and `/runctl autostop`: signed commands through the real Bolt app,
runs executed by the SSM shim, the periodic sweep run with a shifted clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runctl_sandbox import ssm_agent
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.jobs.sweep import sweep
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.autostop import AutostopStore, Verdict, decide
from workers.state.runs import RunState

from .queues import queued
from .slack import click
from .test_launch import slash
from .test_lifecycle import CHANNEL, SLOW, as_dict, dispatch, text_of, train_on, wait_for_epoch

FAST = "--epochs 1 --steps-per-epoch 1 --step-seconds 0"


@pytest.fixture(autouse=True)
def _terminate_the_seed(svc: Services, fleet_seed: SeedInfo) -> Iterator[None]:
    """moto lives for the session: leave no running instances to crowd later tests' fleet listings."""
    yield
    svc.fleet.ec2.terminate_instances(InstanceIds=list(fleet_seed.instances.values()))


def own(svc: Services, iid: str, user: str = "U0ALICE") -> None:
    """Autostop is for the instance's owner (or admins): the runctl:user tag makes Alice its owner."""
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": user}])


def at(svc: Services, moment: datetime) -> None:
    svc.clock = lambda: moment


def test_then_stop_stops_the_instance_when_the_run_ends(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py --then stop -- {FAST}")

    assert svc.fleet.get(iid).state == "stopped"
    run = svc.runs.latest(iid)
    assert run is not None and run.state is RunState.SUCCEEDED and run.then == "stop"
    said = [m.text for m in slack.thread(CHANNEL, run.message_ts or "")]
    assert any("finished (exit 0)" in t for t in said), said
    assert any("was stopped (`--then stop`): saves $1.006/h" in t and f"/runctl start {iid}" in t for t in said), said


def test_without_then_the_instance_keeps_running(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py -- {FAST}")
    run = svc.runs.latest(iid)
    assert run is not None and run.state is RunState.SUCCEEDED and run.then == "keep"
    assert svc.fleet.get(iid).state == "running"


def test_autostop_gives_a_heads_up_then_stops_an_idle_instance(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    t0 = datetime.now(UTC)
    own(svc, iid)
    slash(svc, slack, worker, f"autostop {iid} 30")
    setting = AutostopStore(svc.redis).get(iid)
    assert setting is not None and setting.minutes == 30
    thread = setting.thread_ts
    assert any("set autostop on *cpu-box" in m.text for m in slack.messages(CHANNEL))

    at(svc, t0 + timedelta(minutes=15))
    sweep()
    assert not [m for m in slack.thread(CHANNEL, thread or "") if "Autostop stops it" in m.text]

    at(svc, t0 + timedelta(minutes=21))  # 30 minutes idle less the 10-minute heads-up
    sweep()
    heads_up = [m for m in slack.thread(CHANNEL, thread or "") if "Autostop stops it in" in m.text]
    assert len(heads_up) == 1, [m.text for m in slack.messages(CHANNEL)]
    assert "no live run for 21m" in heads_up[0].text or "no live run for 21 m" in heads_up[0].text
    kinds = {e["action_id"] for b in heads_up[0].blocks if b.get("type") == "actions" for e in b["elements"]}
    assert kinds == {ActionId.AUTOSTOP_KEEP, ActionId.AUTOSTOP_STOP_NOW}

    at(svc, t0 + timedelta(minutes=30, seconds=30))  # due, but the heads-up was only 9.5 minutes ago
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "running"

    at(svc, t0 + timedelta(minutes=31))
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "stopped"
    said = [m.text for m in slack.thread(CHANNEL, thread or "")]
    assert any("Autostop stopped *cpu-box" in t and "saves $0.0416/h" in t for t in said), said


def test_keep_running_1h_postpones_the_stop(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    t0 = datetime.now(UTC)
    own(svc, iid)
    slash(svc, slack, worker, f"autostop {iid} 30")
    at(svc, t0 + timedelta(minutes=25))
    sweep()
    setting = AutostopStore(svc.redis).get(iid)
    assert setting is not None and setting.headsup_ts
    heads_up = next(m for m in slack.messages(CHANNEL) if m.ts == setting.headsup_ts)
    dispatch(svc, slack, worker, click(as_dict(heads_up), ActionId.AUTOSTOP_KEEP, "U0ALICE"))
    assert "keeps" in text_of(next(m for m in slack.messages(CHANNEL) if m.ts == setting.headsup_ts))

    at(svc, t0 + timedelta(minutes=40))
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "running"


def test_autostop_never_stops_an_instance_with_a_live_run(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    t0 = datetime.now(UTC)
    own(svc, iid)
    slash(svc, slack, worker, f"autostop {iid} 30")
    train_on(iid, *SLOW, run_id="r-auto-live")
    wait_for_epoch(sandbox, iid, "r-auto-live", 1)
    for minutes in (25, 45, 120):
        at(svc, t0 + timedelta(minutes=minutes))
        sweep()
    assert not [j for j in queued(svc.redis) if "autostop" in (j.func_name or "")]
    assert svc.fleet.get(iid).state == "running"
    run = svc.runs.get("r-auto-live")
    assert run is not None and not run.state.ended
    assert not [m for m in slack.messages(CHANNEL) if "Autostop stops it" in m.text]


def test_decide_waits_for_the_heads_up_and_never_stops_while_busy() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    idle = now - timedelta(minutes=60)
    assert decide(30, 10, None, now, None) is Verdict.WAIT
    assert decide(30, 10, idle, now, None) is Verdict.HEADS_UP  # overdue: a heads-up first, never a stop
    assert decide(30, 10, idle, now, now - timedelta(minutes=9)) is Verdict.WAIT
    assert decide(30, 10, idle, now, now - timedelta(minutes=10)) is Verdict.STOP
    assert decide(30, 10, None, now, now - timedelta(minutes=10)) is Verdict.RESET
    kept = now + timedelta(minutes=30)
    assert decide(30, 10, idle, now, now - timedelta(minutes=10), kept_until=kept) is Verdict.WAIT
    assert decide(30, 10, idle, kept - timedelta(minutes=10), now - timedelta(minutes=10), kept) is Verdict.HEADS_UP


def test_busy_gpus_restart_the_idle_clock(
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    worker: InlineWorker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An nvidia-smi on the sandbox instances' PATH that reports what the test writes.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'util'}\n")
    fake.chmod(0o755)
    (tmp_path / "util").write_text("87\n2\n")  # two GPUs, the first busy
    # The agent's PATH is fixed (the shim's AGENT_PATH, as under systemd): this instance "has the driver".
    monkeypatch.setattr(ssm_agent, "AGENT_PATH", f"{bin_dir}:{ssm_agent.AGENT_PATH}")
    iid = fleet_seed.instances["gpu-box-1"]
    t0 = datetime.now(UTC)
    own(svc, iid)
    slash(svc, slack, worker, f"autostop {iid} 30")

    at(svc, t0 + timedelta(minutes=25))  # no live run for 25 min, but a GPU at 87 %
    sweep()
    assert not [m for m in slack.messages(CHANNEL) if "Autostop stops it" in m.text]

    (tmp_path / "util").write_text("3\n0\n")
    at(svc, t0 + timedelta(minutes=50))  # idle 25 min since the GPUs were last seen busy
    sweep()
    heads_up = [m for m in slack.messages(CHANNEL) if "Autostop stops it" in m.text]
    assert len(heads_up) == 1 and "no live run for 25m" in heads_up[0].text, [m.text for m in heads_up]
    at(svc, t0 + timedelta(minutes=56))  # 30 min after the busy sighting, but the heads-up was 6 min ago
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "running"
    at(svc, t0 + timedelta(minutes=61))
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "stopped"
