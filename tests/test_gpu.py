"""GPUs in view: per-GPU utilisation and memory from nvidia-smi, gathered by the monitor's
own poll through the SSM shim, shown by `/runctl status` and the run message, nothing where
nvidia-smi is absent; the sweep asks about a live run whose GPUs sit near 0 %."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from runctl_sandbox import ssm_agent
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.jobs.monitor import monitor
from workers.jobs.status import describe
from workers.jobs.sweep import sweep
from workers.remote import gpu
from workers.services import Services
from workers.slack.ids import BlockId
from workers.state.runs import Run, RunState

RUN_ID = "r20261202-010000-9a9a9a"


@pytest.fixture
def training_process() -> Iterator[int]:
    """A live process standing in for the training, so the run counts as alive."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An nvidia-smi on the sandbox instance's PATH (the agent's fixed PATH, as under systemd)
    printing the rows the test writes; like the real one it refuses a query it does not know."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rows = tmp_path / "gpus.csv"
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" != "--query-gpu={gpu.QUERY}" ] || [ "$2" != "--format=csv,noheader,nounits" ]; then\n'
        "  echo 'Field is not a valid field to query.' >&2; exit 2\n"
        "fi\n"
        f"cat {rows}\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(ssm_agent, "AGENT_PATH", f"{bin_dir}:{ssm_agent.AGENT_PATH}")
    return rows


def live_run(svc: Services, sandbox: Sandbox, iid: str, pid: int) -> Run:
    rdir = sandbox.instance_dir(iid) / "runs" / RUN_ID
    rdir.mkdir(parents=True)
    (rdir / "pid").write_text(f"{pid}\n")
    (rdir / "training.log").write_text("epoch 1/10 loss=0.5\n")
    run = Run(
        run_id=RUN_ID,
        instance_id=iid,
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train.py",
        state=RunState.RUNNING,
        started_at=svc.clock(),
    )
    svc.runs.create(run)
    return svc.runs.save(run)


def progress_block(slack: FakeSlack, ts: str | None) -> str:
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == ts)
    return str(next(b for b in parent.blocks if b.get("block_id") == BlockId.RUN_PROGRESS)["text"]["text"])


def test_status_and_the_run_message_show_each_gpu_from_nvidia_smi(
    svc: Services,
    fleet_seed: SeedInfo,
    sandbox: Sandbox,
    slack: FakeSlack,
    training_process: int,
    nvidia_smi: Path,
) -> None:
    nvidia_smi.write_text("0, 87, 10035, 24564\n1, 3, 512, 24564\n")  # what nvidia-smi prints: MiB, %
    iid = fleet_seed.instances["gpu-box-1"]
    live_run(svc, sandbox, iid, training_process)

    assert monitor(RUN_ID) == "polled 1"

    line = "GPU 0: 87% · 9.8/24.0 GiB  |  GPU 1: 3% · 0.5/24.0 GiB"
    assert line in describe(iid).splitlines()
    run = svc.runs.get(RUN_ID)
    assert run is not None and line in progress_block(slack, run.message_ts)
    # One SSM command per poll: the GPU figures came with the run's status, not on their own.
    assert len([s for s in sandbox.sent_scripts(iid) if "nvidia-smi" in s]) == 1


def test_without_nvidia_smi_nothing_about_gpus_is_shown(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, training_process: int
) -> None:
    if shutil.which("nvidia-smi", path=ssm_agent.AGENT_PATH):
        pytest.skip("this machine has a real nvidia-smi")
    iid = fleet_seed.instances["cpu-box"]
    live_run(svc, sandbox, iid, training_process)

    assert monitor(RUN_ID) == "polled 1"

    assert "GPU" not in describe(iid)
    run = svc.runs.get(RUN_ID)
    assert run is not None and run.gpus is None and "GPU" not in progress_block(slack, run.message_ts)


def test_the_sweep_asks_about_a_live_run_whose_gpus_sit_near_zero(
    svc: Services,
    fleet_seed: SeedInfo,
    sandbox: Sandbox,
    slack: FakeSlack,
    training_process: int,
    nvidia_smi: Path,
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    t0 = svc.clock()
    live_run(svc, sandbox, iid, training_process)
    nvidia_smi.write_text("0, 0, 300, 16160\n")
    monitor(RUN_ID)
    svc.clock = lambda: t0 + timedelta(minutes=20)
    monitor(RUN_ID)
    sweep()
    assert not [m for m in slack.messages("C0TRAIN") if "CPU-bound" in m.text]  # 20 min < 30

    nvidia_smi.write_text("0, 64, 9000, 16160\n")  # busy again: the clock starts over
    svc.clock = lambda: t0 + timedelta(minutes=25)
    monitor(RUN_ID)
    nvidia_smi.write_text("0, 1, 9000, 16160\n")
    svc.clock = lambda: t0 + timedelta(minutes=30)
    monitor(RUN_ID)
    svc.clock = lambda: t0 + timedelta(minutes=50)
    sweep()
    assert not [m for m in slack.messages("C0TRAIN") if "CPU-bound" in m.text]  # 20 min since busy

    svc.clock = lambda: t0 + timedelta(minutes=61)
    monitor(RUN_ID)
    sweep()
    run = svc.runs.get(RUN_ID)
    assert run is not None
    said = [m.text for m in slack.thread("C0TRAIN", run.message_ts or "")]
    warned = [t for t in said if "stuck or CPU-bound?" in t]
    assert len(warned) == 1 and "at or below 5 % for 31m" in warned[0], said
