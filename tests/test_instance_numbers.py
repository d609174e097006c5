"""Numbers an instance writes are checked where they are parsed (issue 23 G): `Infinity`,
NaN, 1e400 and huge integers in one run's progress file drop those fields of that run, and
the monitor's tick still updates every other run it polls in the same command."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.jobs.monitor import tick
from workers.remote.status import progress_from_file
from workers.services import Services
from workers.slack.format import bar, duration
from workers.state.polls import DUE
from workers.state.runs import RunState

from .test_progress import PROGRESS, live_run, progress_block

# Each is valid JSON to Python's json module, as a progress file is read.
BAD = '{"epoch": 2, "total_epochs": 10, "eta_seconds": 1e400, "metrics": {"loss": NaN, "acc": 0.5, "big": -Infinity}}'
WORSE = '{"epoch": Infinity, "total_epochs": 10, "step": 7, "total_steps": 1e400, "eta_seconds": Infinity, "updated_at": 1e30, "metrics": {"acc": 0.25, "huge": 1e999}}'
GOOD_ID, BAD_ID, WORSE_ID = "r20261206-071500-600d00", "r20261206-071500-bad000", "r20261206-071500-bad001"


@pytest.fixture
def processes() -> Iterator[list[int]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    yield [p.pid for p in procs]
    for proc in procs:
        proc.kill()
        proc.wait()


def test_runs_with_infinite_progress_keep_their_good_fields_and_the_other_run_updates(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, processes: list[int]
) -> None:
    boxes = [fleet_seed.instances[name] for name in ("gpu-box-1", "gpu-box-2", "cpu-box")]
    live_run(svc, sandbox, boxes[0], processes[0], "starting\n", BAD, BAD_ID)
    live_run(svc, sandbox, boxes[1], processes[1], "starting\n", WORSE, WORSE_ID)
    live_run(svc, sandbox, boxes[2], processes[2], "starting\n", json.dumps(PROGRESS), GOOD_ID)
    now = svc.clock().timestamp()
    svc.redis.zadd(DUE, {BAD_ID: now - 3, WORSE_ID: now - 2, GOOD_ID: now - 1})  # the good run is polled last

    assert tick() == "polled 3"

    good = svc.runs.get(GOOD_ID)
    assert good is not None and good.state is RunState.RUNNING
    text = progress_block(slack, good.message_ts)
    assert "epoch 3/10" in text and "ETA 2m 05s" in text, text
    for run_id, said in ((BAD_ID, ("epoch 2/10", "acc 0.5")), (WORSE_ID, ("step 7", "acc 0.25"))):
        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.RUNNING and run.progress is not None, run
        shown = progress_block(slack, run.message_ts)
        assert all(s in shown for s in said), shown
        assert "ETA" not in shown and "inf" not in shown.lower() and "nan" not in shown.lower(), shown
        assert run.progress.eta_seconds is None and run.progress.updated_at is None
    worse = svc.runs.get(WORSE_ID)
    assert worse is not None and worse.progress is not None
    assert (
        worse.progress.epoch is None and worse.progress.total_steps is None and worse.progress.metrics == {"acc": 0.25}
    )


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
