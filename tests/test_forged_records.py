"""A training that prints the bot's record lines (issue 23 D) is still the running training
it is: through train, the executing SSM and the monitor's poll, forged `exit`, `spot`, `run`
and `gpu` lines in its log, a progress file and a checkpoint name end nothing, resume nothing;
nor does a spot notice file it writes itself on an on-demand instance."""

from __future__ import annotations

import time
from pathlib import Path

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers import remote
from workers.commands import StatusCommand, TrainCommand
from workers.jobs.monitor import monitor
from workers.jobs.status import status
from workers.jobs.train import train
from workers.queueing import JobPath
from workers.services import Services
from workers.state.locks import train_lock
from workers.state.runs import RunState

from .test_keep_work import BRANCH, commit
from .test_lifecycle import ALICE, CHANNEL, run_dir

BOB_JSON = {"user_id": "U0BOB", "channel_id": CHANNEL}
OTHER = "r20261206-000000-000000"
FORGES = """import json, os, time
FORGED = [
    "::runctl::exit 0",
    '::runctl::spot 1700000000 {"action": "terminate", "time": "2026-12-06T07:00:00Z"}',
    "::runctl::run OTHER",
    "::runctl::exit 0",
    "::runctl::gpu 0, 0, 1, 2",
    "::runctl::end",
]
print("\\n".join(FORGED), flush=True)
print("epoch 1/5 loss=0.5", flush=True)
print("\\r".join(FORGED), flush=True)
with open(os.environ["RUNCTL_PROGRESS_FILE"], "w") as f:
    f.write("\\n".join(FORGED) + "\\n")
ck = os.environ["RUNCTL_CHECKPOINT_DIR"]
os.makedirs(ck, exist_ok=True)
with open(os.path.join(ck, "ckpt-epoch-1.pt\\r::runctl::exit 0"), "w") as f:
    f.write("weights")
with open(os.path.join(os.environ["RUNCTL_RUN_DIR"], "spot_interruption"), "w") as f:
    f.write('{"action": "terminate", "time": "2026-12-06T07:00:00Z"}')  # on an on-demand instance
print("ready", flush=True)
time.sleep(120)
""".replace("OTHER", OTHER)


def wait_for_line(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace").splitlines():
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} never said {text!r}")


def test_forged_record_lines_leave_the_run_running_locked_and_unresumed(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, example_repo: Path
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    commit(example_repo, {"forges.py": FORGES}, "prints runctl's record lines")
    run_id = "r20261206-070000-f0f0f0"
    cmd = TrainCommand(instance_id=iid, script="forges.py", ref=BRANCH, auto_resume=True)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    try:
        wait_for_line(run_dir(sandbox, iid, run_id) / "training.log", "ready")
        for _ in range(2):
            assert monitor(run_id).startswith("polled")

        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.RUNNING, run
        assert run.exit_code is None and not run.spot_notice and run.ended_at is None
        assert run.progress is not None and (run.progress.epoch, run.progress.total_epochs) == (1, 5)
        assert run.gpus is None  # the sandbox has no nvidia-smi: the log's `gpu` line is not one
        holder = train_lock(svc.redis, iid).holder()
        assert holder is not None and holder.run_id == run_id
        jobs = [j.func_name for j in svc.queue.get_jobs()]
        assert JobPath.SPOT_REPLACE.value not in jobs, jobs
        said = [m.text for m in slack.thread(CHANNEL, run.message_ts or "")]
        assert not any("finished" in t or "spot interruption" in t for t in said), said

        assert status(StatusCommand(instance_id=iid).model_dump(mode="json"), BOB_JSON) == "answered"
        text = slack.ephemerals("U0BOB")[-1].text
        assert f"Live run `{run_id}`: <@U0ALICE>" in text, text
        assert f"Train lock: run `{run_id}` by <@U0ALICE>" in text, text
    finally:
        svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, run_id, 10), 60)
