"""The train flow against moto + the executing-SSM shim + real Redis."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TrainCommand
from workers.jobs.train import train
from workers.services import Services
from workers.state.locks import train_lock
from workers.state.runs import RunState

from .conftest import sent_commands

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
BOB = Actor(user_id="U0BOB", channel_id="C0TRAIN")


def start(iid: str, script: str = "train_with_checkpoints.py", *args: str, who: Actor = ALICE, **kw: Any) -> str:
    cmd = TrainCommand(instance_id=iid, script=script, args=args, **kw)
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"
    train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), run_id)
    return run_id


def thread_texts(slack: FakeSlack, channel: str, ts: str | None) -> list[str]:
    assert ts is not None
    return [m.text for m in slack.thread(channel, ts)]


def test_stopped_instance_gets_the_fix(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    iid = fleet_seed.instances["old-box"]
    run = svc.runs.get(start(iid))
    assert run is not None and run.state is RunState.REFUSED
    assert run.error is not None and "stopped" in run.error.what
    assert run.error.fix == f"/runctl start {iid}"
    # pre-flight: told to the requester alone, nothing posted in the channel
    assert run.message_ts is None and slack.messages("C0TRAIN") == []
    assert any(f"/runctl start {iid}" in m.text for m in slack.ephemerals("U0ALICE"))


def test_unmanaged_instance_is_refused_with_the_tag_command_for_an_admin(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["not-managed"]
    run = svc.runs.get(start(iid, who=Actor(user_id="U0ADMIN", channel_id="C0TRAIN")))
    assert run is not None and run.state is RunState.REFUSED
    assert run.error is not None and "not managed" in run.error.what
    assert "create-tags" in run.error.fix and "runctl:managed" in run.error.fix
    assert sent_commands(svc, iid) == []


def test_missing_script_fails_before_any_ssm_command(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run = svc.runs.get(start(iid, "train_with_checkpoint.py"))
    assert run is not None and run.state is RunState.REFUSED
    assert run.error is not None and "does not exist" in run.error.what
    assert "train_with_checkpoints.py" in run.error.what  # the suggestion
    assert sent_commands(svc, iid) == []


def test_syntax_error_fails_before_any_ssm_command(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run = svc.runs.get(start(iid, "broken.py"))
    assert run is not None and run.error is not None
    assert "syntax error at line 3" in run.error.what
    assert "broken.py:3" in run.error.detail
    assert sent_commands(svc, iid) == []
    assert train_lock(svc.redis, iid).holder() is None


def test_unknown_ref_is_refused_with_known_branches(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run = svc.runs.get(start(iid, ref="mian"))
    assert run is not None and run.error is not None
    assert "`mian` is not a branch" in run.error.what and "`main`" in run.error.what
    assert sent_commands(svc, iid) == []


def test_run_is_started_followed_and_finishes(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = start(
        iid, "train_with_checkpoints.py", "--epochs", "3", "--steps-per-epoch", "3", "--step-seconds", "0.05"
    )
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    assert run.exit_code == 0
    # the default checkpoint interval was added, and said so
    assert run.args[-2:] == ("--checkpoint-interval", "1")
    assert any("--checkpoint-interval 1" in n for n in run.notes)
    ckdir = sandbox.instance_dir(iid) / "runs" / run_id / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("ckpt-epoch-*.json")) == [
        "ckpt-epoch-00001.json",
        "ckpt-epoch-00002.json",
        "ckpt-epoch-00003.json",
    ]
    # one parent message, updated in place, with the outcome in its thread
    parents = [m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts]
    assert len(parents) == 1 and "Finished" in str(parents[0].blocks)
    assert len(slack.calls_to("chat.postMessage")) >= 2
    assert len(slack.calls_to("chat.update")) >= 2
    replies = thread_texts(slack, "C0TRAIN", run.message_ts)
    assert any("finished (exit 0)" in t and "<@U0ALICE>" in t and "ckpt-epoch-00003.json" in t for t in replies)
    assert train_lock(svc.redis, iid).holder() is None


def test_nonzero_exit_is_reported_as_failure_with_log_tail(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_id = start(
        iid,
        "train_with_checkpoints.py",
        "--epochs",
        "5",
        "--steps-per-epoch",
        "2",
        "--step-seconds",
        "0.05",
        "--fail-at-epoch",
        "2",
    )
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.FAILED
    assert run.exit_code not in (0, None)
    replies = thread_texts(slack, "C0TRAIN", run.message_ts)
    failure = next(t for t in replies if "failed with exit code" in t)
    assert "<@U0ALICE>" in failure and "training.log" in failure and "epoch 1/5" in failure
    assert train_lock(svc.redis, iid).holder() is None


def test_script_args_reach_the_script_verbatim(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, worker: InlineWorker, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    tricky = ("--epochs", "1", "--steps-per-epoch", "1", "--step-seconds", "0")
    run_id = start(iid, "train_with_checkpoints.py", *tricky, checkpoint_interval=2)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    assert run.args == (*tricky, "--checkpoint-interval", "2")
    # runctl's own --checkpoint-interval 2 was passed: the note says it was passed on, not "you did not pass one"
    assert run.message_ts is not None  # the note is said in the thread (issue 17), once
    shown = "\n".join(m.text for m in slack.thread(run.channel_id, run.message_ts))
    assert "Passed your `--checkpoint-interval 2` on to the script" in shown and "did not pass" not in shown


def test_no_checkpointing_script_is_warned_about(svc: Services, fleet_seed: SeedInfo, worker: InlineWorker) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = start(iid, "no_checkpoints.py")
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    assert any("no sign of checkpointing" in n for n in run.notes)
    assert run.progress is not None and run.progress.source == "log" and run.progress.epoch == 3


def test_no_sync_code_with_missing_script_says_so(svc: Services, fleet_seed: SeedInfo) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run = svc.runs.get(start(iid, "never_shipped.py", sync_code=False))
    assert run is not None and run.state is RunState.REFUSED
    assert run.error is not None and "is not on" in run.error.what
    assert "--no-sync-code" in run.error.why


def test_live_process_blocks_second_run_even_without_redis_lock(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    first = start(iid, "train_with_checkpoints.py", "--epochs", "50", "--step-seconds", "0.05")
    assert svc.runs.get(first).state is RunState.RUNNING  # type: ignore[union-attr]
    svc.redis.delete(train_lock(svc.redis, iid).key)  # Redis lost the lock
    second = svc.runs.get(start(iid, who=BOB))
    assert second is not None and second.state is RunState.REFUSED
    assert second.error is not None and "busy" in second.error.what and first in second.error.what
    assert "--force" in second.error.fix and f"/runctl stop {iid}" in second.error.fix
    # the first run is untouched
    from workers import remote

    probe = svc.fleet.run(iid, remote.probe_live_runs(svc.settings.RUNCTL_REMOTE_ROOT))
    assert f"live {first} " in probe.stdout
    svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, first, 10), 60)


def test_fifty_concurrent_train_jobs_start_exactly_one_run(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    svc.repo.sync()  # warm the mirror so the race is about the lock
    barrier = threading.Barrier(50)
    run_ids: list[str] = []

    def job(n: int) -> None:
        cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=("--epochs", "30"))
        run_id = f"r-race-{n:02d}"
        run_ids.append(run_id)
        barrier.wait()
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    states = [svc.runs.get(r).state for r in run_ids]  # type: ignore[union-attr]
    assert states.count(RunState.RUNNING) == 1
    assert states.count(RunState.REFUSED) == 49
    launched = [s for s in sandbox.sent_scripts(iid) if "setsid sh" in s]
    assert len(launched) == 1
    winner = run_ids[states.index(RunState.RUNNING)]
    from workers import remote

    svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, winner, 10), 60)


def test_status_shows_state_live_run_progress_and_lock_holder(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    from workers.commands import StatusCommand
    from workers.jobs.status import status

    iid = fleet_seed.instances["gpu-box-2"]
    run_id = start(iid, "train_with_checkpoints.py", "--epochs", "50", "--step-seconds", "0.05")
    assert status(StatusCommand(instance_id=iid).model_dump(mode="json"), BOB.model_dump(mode="json")) == "answered"
    text = slack.ephemerals("U0BOB")[-1].text
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING, run.error if run else None
    assert f"gpu-box-2 ({iid})" in text and "p3.2xlarge" in text and "`running`" in text, text
    assert f"Live run `{run_id}`: <@U0ALICE>" in text and "train_with_checkpoints.py" in text, text
    assert f"Train lock: run `{run_id}` by <@U0ALICE>" in text, text
    from workers import remote

    svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, run_id, 10), 60)
