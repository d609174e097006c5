"""Numbers an instance writes are checked where they are parsed (issue 23 G): `Infinity`,
NaN, 1e400 and huge integers in one run's progress file drop those fields of that run, and
the monitor's tick still updates every other run it polls in the same command."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from workers.jobs.monitor import DUE, tick
from workers.remote.status import progress_from_file
from workers.sandbox.aws import Sandbox, SeedInfo
from workers.sandbox.fake_slack import FakeSlack
from workers.services import Services
from workers.slack.format import bar, duration
from workers.state.runs import RunState

from .test_progress import PROGRESS, live_run, progress_block

BAD = (
    '{"epoch": Infinity, "total_epochs": 10, "step": 7, "total_steps": 1e400, "eta_seconds": 1e400,'
    ' "updated_at": 1e30, "metrics": {"loss": NaN, "acc": 0.5, "big": -Infinity, "huge": 1e999}}'
)
GOOD_ID, BAD_ID = "r20261206-071500-600d00", "r20261206-071500-bad000"


@pytest.fixture
def processes() -> Iterator[tuple[int, int]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield procs[0].pid, procs[1].pid
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_run_with_infinite_progress_keeps_its_good_fields_and_the_other_run_updates(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, processes: tuple[int, int]
) -> None:
    bad_box, good_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    live_run(svc, sandbox, bad_box, processes[0], "starting\n", BAD, BAD_ID)
    live_run(svc, sandbox, good_box, processes[1], "starting\n", json.dumps(PROGRESS), GOOD_ID)
    now = svc.clock().timestamp()
    svc.redis.zadd(DUE, {BAD_ID: now - 2, GOOD_ID: now - 1})  # the bad run is polled first

    assert tick() == "polled 2"

    good, bad = svc.runs.get(GOOD_ID), svc.runs.get(BAD_ID)
    assert good is not None and good.state is RunState.RUNNING
    text = progress_block(slack, good.message_ts)
    assert "epoch 3/10" in text and "ETA 2m 05s" in text, text
    assert bad is not None and bad.state is RunState.RUNNING and bad.progress is not None
    shown = progress_block(slack, bad.message_ts)
    assert "step 7" in shown and "acc 0.5" in shown, shown
    assert "ETA" not in shown and "inf" not in shown.lower() and "nan" not in shown.lower(), shown
    assert bad.progress.epoch is None and bad.progress.total_steps is None and bad.progress.eta_seconds is None
    assert bad.progress.metrics == {"acc": 0.5} and bad.progress.updated_at is None


def test_progress_fields_out_of_bounds_are_dropped_one_by_one() -> None:
    progress = progress_from_file(
        '{"epoch": 99999999999999999999999, "total_epochs": -3, "step": 4, "total_steps": 8, "eta_seconds": -1}'
    )
    assert progress is not None
    assert (progress.epoch, progress.total_epochs, progress.step, progress.total_steps) == (None, None, 4, 8)
    assert progress.eta_seconds is None
    assert progress_from_file('{"epoch": NaN, "eta_seconds": Infinity}') is None  # nothing usable: the log is read


def test_format_helpers_take_any_float() -> None:
    assert duration(float("inf")) == duration(float("nan")) == "unknown"
    assert duration(1e300).endswith("d 0h")
    assert bar(float("nan")).endswith(" 0%")
