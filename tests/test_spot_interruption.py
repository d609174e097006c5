"""Spot interruptions: the wrapper on a spot instance polls the (fake) IMDSv2 for a notice,
SIGTERMs the training when one is raised, and the bot reports the checkpoint it saved."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.remote import core
from workers.services import Services
from workers.state.runs import RunState

from .test_launch import template  # noqa: F401 (a fixture)
from .test_lifecycle import CHANNEL, SLOW, run_dir, train_on, wait_for_epoch
from .test_spot import spot_instance


def wait_for(condition: object, what: str, timeout: float = 30) -> float:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_raised_notice_makes_the_training_checkpoint_and_the_bot_report_it(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = spot_instance(svc, "persistent", "spot-watched")
    try:
        with sandbox.metadata() as imds:
            run_id = train_on(iid, *SLOW)  # checkpoint interval 100: only the SIGTERM saves
            wait_for_epoch(sandbox, iid, run_id, 2)
            # IMDSv2 as documented: a token by PUT, then the GET with it.
            wait_for(lambda: ("GET", "/latest/meta-data/spot/instance-action") in imds.asked(iid), "a poll")
            assert imds.asked(iid)[0] == ("PUT", "/latest/api/token")

            notice = imds.raise_notice(iid, "stop")
            rdir = run_dir(sandbox, iid, run_id)
            took = wait_for(lambda: (rdir / "exit_code").exists(), "the training to exit")
        assert took < 12, took  # polled every 5 s; the checkpoint is written on SIGTERM

        saved = sorted(p.name for p in (rdir / "checkpoints").glob("ckpt-epoch-*.json"))
        assert len(saved) == 1, saved
        epoch = int(saved[0].removeprefix("ckpt-epoch-").removesuffix(".json"))
        assert (rdir / "exit_code").read_text().strip() == "143"
        assert json.loads((rdir / "spot_interruption").read_text()) == notice

        worker.drain(timeout=60)
        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.STOPPED and run.spot
        said = [m.text for m in slack.thread(CHANNEL, run.message_ts or "")]
        report = [t for t in said if "spot interruption" in t]
        assert len(report) == 1, said
        assert f"spot interruption: checkpoint epoch {epoch} saved (`{saved[0]}`)" in report[0]
        assert f"stop at {notice['time']}" in report[0] and "exit 143" in report[0]
        assert f"then `/runctl resume {run_id} --on <instance-id>`" in report[0]
    finally:
        svc.fleet.terminate(iid)


def test_on_demand_runs_do_not_watch_the_metadata() -> None:
    plain = core.wrapper("r1", "train.py", [], {})
    watched = core.wrapper("r1", "train.py", [], {}, spot_watch=True)
    assert "instance-action" not in plain
    assert "/latest/api/token" in watched and "${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}" in watched


def test_a_spot_run_is_polled_at_least_every_30_seconds(svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox) -> None:
    """Backoff may reach RUNCTL_POLL_MAX_SECONDS (4 min), longer than a notice's two minutes."""
    import subprocess

    from workers.jobs.monitor import monitor
    from workers.state.polls import DUE
    from workers.state.runs import Run

    svc.settings = svc.settings.model_copy(update={"RUNCTL_POLL_MIN_SECONDS": 5, "RUNCTL_POLL_MAX_SECONDS": 240})
    iid = fleet_seed.instances["gpu-box-1"]
    proc = subprocess.Popen(["sleep", "60"])
    try:
        for run_id, spot in (("r-spot-poll", True), ("r-plain-poll", False)):
            rdir = sandbox.instance_dir(iid) / "runs" / run_id
            rdir.mkdir(parents=True)
            (rdir / "pid").write_text(f"{proc.pid}\n")
            run = Run(
                run_id=run_id,
                instance_id=iid,
                user_id="U0ALICE",
                channel_id=CHANNEL,
                script="t.py",
                state=RunState.RUNNING,
                started_at=svc.clock(),
                polls=20,
                spot=spot,
                wait=False,
            )
            svc.runs.create(run)
            svc.runs.save(run)
            monitor(run_id)
            wait = float(svc.redis.zscore(DUE, run_id) or 0) - svc.clock().timestamp()
            assert (wait <= 30) if spot else (wait > 200), (run_id, wait)
    finally:
        proc.kill()
        proc.wait()


def test_a_checkpoint_older_than_the_signal_is_reported_as_losing_work() -> None:
    """A script with no SIGTERM handler leaves only what it saved before the notice."""
    from datetime import UTC, datetime, timedelta

    from workers.jobs.monitor import spot_report
    from workers.state.runs import Checkpoint, Run

    signalled = datetime(2026, 12, 2, 1, 0, 0, tzinfo=UTC)
    notice = '{"action": "terminate", "time": "2026-12-02T01:02:00Z"}'
    checkpoint = Checkpoint(
        name="ckpt-epoch-00003.json", size=9, epoch=3, modified_at=signalled - timedelta(seconds=40)
    )
    run = Run(
        run_id="r1",
        instance_id="i-1",
        user_id="U0ALICE",
        channel_id=CHANNEL,
        script="t.py",
        spot_notice=notice,
        spot_signalled_at=signalled,
        checkpoint=checkpoint,
    )
    text = spot_report(run, "ended (exit 143)")
    assert "no checkpoint after the signal; the newest is epoch 3" in text and "later progress is lost" in text
    assert "terminate at 2026-12-02T01:02:00Z" in text
    run.checkpoint = checkpoint.model_copy(update={"modified_at": signalled})  # the same second: saved on it
    assert "spot interruption: checkpoint epoch 3 saved" in spot_report(run, "ended (exit 143)")
    run.checkpoint = None
    assert ":rotating_light:" in spot_report(run, "ended (exit 143)")


@pytest.mark.usefixtures("template")  # the launch file with preset `gpu` (tests/test_launch.py)
def test_auto_resume_continues_on_a_replacement_at_the_next_epoch(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    from workers.aws import launcher
    from workers.aws.launcher import Launcher
    from workers.commands import Actor, LaunchCommand, TrainCommand
    from workers.jobs.launch import resolve
    from workers.jobs.train import train

    from .test_lifecycle import ALICE, EPOCH_LINE

    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None  # the interrupted instance counts until AWS takes it: room for the replacement
    path.write_text(path.read_text().replace("user_instances = 1", "user_instances = 2  # and its replacement"))
    config = launcher.load(path)
    spec = resolve(svc, config, LaunchCommand(target="gpu", spot=True), Actor(user_id="U0ALICE", channel_id=CHANNEL))
    fleet = Launcher(svc.fleet)
    first = fleet.run(config.template, spec, "U0ALICE", "spot-first-launch", ("runctl:managed", "true"))
    fleet.wait_running(first, 0.2, 60)
    wait_for(lambda: svc.fleet.agent_status([first]).get(first) == "Online", "the agent")

    # 1 s epochs: the watcher polls every 5 s, so the notice lands well before the last epoch
    args = ("--epochs", "12", "--steps-per-epoch", "4", "--step-seconds", "0.25", "--checkpoint-interval", "100")
    with sandbox.metadata() as imds:
        cmd = TrainCommand(instance_id=first, script="train_with_checkpoints.py", args=args, auto_resume=True)
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-auto-1")
        wait_for_epoch(sandbox, first, "r-auto-1", 3)
        imds.raise_notice(first, "stop")
        wait_for(lambda: (run_dir(sandbox, first, "r-auto-1") / "exit_code").exists(), "the training to exit")
        worker.drain(timeout=240)  # the end, the backup, the replacement's launch, the resumed run

    old = svc.runs.get("r-auto-1")
    assert old is not None
    said = [m.text for m in slack.thread(CHANNEL, old.message_ts or "")]
    assert any("spot interruption: checkpoint epoch" in t for t in said), said
    assert any("launched `i-" in t and "from preset `gpu`" in t for t in said), said
    new_iid = next(t.split("launched `")[1].split("`")[0] for t in said if "launched `i-" in t)
    assert new_iid != first
    new = svc.runs.latest(new_iid)
    assert new is not None and new.state is RunState.SUCCEEDED, new
    before = [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, first, "r-auto-1") / "training.log").read_text())]
    after = [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, new_iid, new.run_id) / "training.log").read_text())]
    assert before + after == list(range(1, 13)), (before, after)  # epochs exactly 1..N across both
    assert new.auto_resume and new.spot and new.restore_from == "r-auto-1"  # from S3: another disk
    # EC2 would restart the stop-interrupted instance when capacity returns: its request is cancelled
    requests = svc.fleet.ec2.describe_spot_instance_requests(Filters=[{"Name": "instance-id", "Values": [first]}])
    assert [r["State"] for r in requests["SpotInstanceRequests"]] == ["cancelled"]
    assert any("was cancelled, so EC2 will not restart it" in t and f"/runctl terminate {first}" in t for t in said)


@pytest.mark.usefixtures("template")
def test_then_terminate_waits_until_the_auto_resume_backup_finished(
    svc: Services,
    fleet_seed: SeedInfo,
    sandbox: Sandbox,
    slack: FakeSlack,
    worker: InlineWorker,
    tmp_path: Path,
) -> None:
    """Issue 25 item 8: `--then terminate` of an interrupted `--auto-resume` run fires only once
    the checkpoint its SIGTERM saved is in S3 (the old code terminated the instance first)."""
    policy = tmp_path / "policy.toml"  # Alice may terminate, as in a team's policy file
    policy.write_text('[roles]\nml = ["U0ALICE"]\n[commands]\nterminate = ["ml", "admin"]\n')
    svc.settings.RUNCTL_POLICY_FILE = policy
    from workers.aws import backups, launcher
    from workers.aws.launcher import Launcher
    from workers.commands import Actor, LaunchCommand, TrainCommand
    from workers.jobs.launch import resolve
    from workers.jobs.train import train

    from .test_lifecycle import ALICE, EPOCH_LINE

    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None
    path.write_text(path.read_text().replace("user_instances = 1", "user_instances = 2  # and its replacement"))
    config = launcher.load(path)
    spec = resolve(svc, config, LaunchCommand(target="gpu", spot=True), Actor(user_id="U0ALICE", channel_id=CHANNEL))
    fleet = Launcher(svc.fleet)
    first = fleet.run(config.template, spec, "U0ALICE", "spot-then-launch", ("runctl:managed", "true"))
    fleet.wait_running(first, 0.2, 60)
    wait_for(lambda: svc.fleet.agent_status([first]).get(first) == "Online", "the agent")

    args = ("--epochs", "12", "--steps-per-epoch", "4", "--step-seconds", "0.25", "--checkpoint-interval", "100")
    with sandbox.metadata() as imds:
        cmd = TrainCommand(
            instance_id=first, script="train_with_checkpoints.py", args=args, auto_resume=True, then="terminate"
        )
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-auto-then")
        wait_for_epoch(sandbox, first, "r-auto-then", 3)
        imds.raise_notice(first, "stop")
        wait_for(lambda: (run_dir(sandbox, first, "r-auto-then") / "exit_code").exists(), "the training to exit")
        saved = sorted(p.name for p in (run_dir(sandbox, first, "r-auto-then") / "checkpoints").glob("ckpt-*"))
        worker.drain(timeout=240)

    old = svc.runs.get("r-auto-then")
    assert old is not None
    said = [m.text for m in slack.thread(CHANNEL, old.message_ts or "")]
    manifest = backups.load(svc.fleet, "r-auto-then")
    assert manifest is not None and saved and {f.name for f in manifest.files} >= set(saved), (saved, said)
    assert any("was terminated (`--then terminate`)" in t for t in said), said
    assert svc.fleet.get(first).state in ("shutting-down", "terminated")
    new_iid = next(t.split("launched `")[1].split("`")[0] for t in said if "launched `i-" in t)
    new = svc.runs.latest(new_iid)
    assert new is not None and new.state is RunState.SUCCEEDED, (new, said)
    before = [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, first, "r-auto-then") / "training.log").read_text())]
    after = [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, new_iid, new.run_id) / "training.log").read_text())]
    assert before + after == list(range(1, 13)), (before, after)


def spot_from_preset(svc: Services, token: str) -> str:
    """Launched as `/runctl launch gpu --spot` does: persistent, stop-type (tests/test_launch.py's preset)."""
    from workers.aws import launcher
    from workers.aws.launcher import Launcher
    from workers.commands import Actor, LaunchCommand
    from workers.jobs.launch import resolve

    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None  # the interrupted instance counts until AWS takes it: room for a replacement
    path.write_text(path.read_text().replace("user_instances = 1", "user_instances = 2  # and its replacement"))
    config = launcher.load(path)
    spec = resolve(svc, config, LaunchCommand(target="gpu", spot=True), Actor(user_id="U0ALICE", channel_id=CHANNEL))
    fleet = Launcher(svc.fleet)
    iid = fleet.run(config.template, spec, "U0ALICE", token, ("runctl:managed", "true"))
    fleet.wait_running(iid, 0.2, 60)
    wait_for(lambda: svc.fleet.agent_status([iid]).get(iid) == "Online", "the agent")
    return iid


# Ignores SIGTERM and checkpoints every epoch: as a long save keeps a training busy past the notice.
BUSY = ("--epochs", "20", "--steps-per-epoch", "4", "--step-seconds", "0.25", "--checkpoint-interval", "1")


def start_busy_run(svc: Services, sandbox: Sandbox, iid: str, run_id: str) -> None:
    from workers.commands import TrainCommand
    from workers.jobs.train import train

    from .test_lifecycle import ALICE

    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=(*BUSY, "--ignore-sigterm"))
    cmd = cmd.model_copy(update={"auto_resume": True})
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    wait_for_epoch(sandbox, iid, run_id, 2)


def epochs(sandbox: Sandbox, iid: str, run_id: str) -> list[int]:
    from .test_lifecycle import EPOCH_LINE

    return [int(e) for e in EPOCH_LINE.findall((run_dir(sandbox, iid, run_id) / "training.log").read_text())]


@pytest.mark.usefixtures("template")
def test_the_auto_resume_backup_starts_when_the_notice_is_read_not_after_the_exit(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Issue 25 item 7: the monitor reads the notice while the training still runs, and the
    backup starts then; EC2 stops the instance after the (scaled) two minutes, and the run goes
    on elsewhere from what S3 holds. The old code backed up only after the exit, when the
    instance was already stopped: nothing in S3, no resume."""
    from workers.aws import backups
    from workers.jobs.monitor import monitor

    first, rid = spot_from_preset(svc, "spot-early-launch"), "r-auto-early"
    rdir = run_dir(sandbox, first, rid)
    with sandbox.metadata():
        start_busy_run(svc, sandbox, first, rid)
        sandbox.interrupt(first, "stop", after=10, restart_after=600)
        wait_for(lambda: (rdir / "spot_interruption").exists(), "the watcher to act on the notice")
        start = time.monotonic()
        while backups.load(svc.fleet, rid) is None and time.monotonic() - start < 8:
            monitor(rid)  # the run's next poll, as the tick runs it
            worker.work()
            time.sleep(0.2)
        early = backups.load(svc.fleet, rid)
        assert early is not None and early.files, "no backup started at the notice"
        assert not (rdir / "exit_code").exists() and svc.fleet.get(first).state == "running"
        wait_for(lambda: svc.fleet.get(first).state == "stopped", "EC2 to stop the instance", timeout=30)
        worker.drain(timeout=240)  # lost with the instance; a replacement resumes from S3

    old = svc.runs.get(rid)
    assert old is not None
    said = [m.text for m in slack.thread(CHANNEL, old.message_ts or "")]
    assert not any("was not resumed" in t for t in said), said
    new_iid = next(t.split("launched `")[1].split("`")[0] for t in said if "launched `i-" in t)
    new = svc.runs.latest(new_iid)
    assert new is not None and new.state is RunState.SUCCEEDED, (new, said)
    saved = max(int(f.name[11:16]) for f in early.files if f.name.startswith("ckpt-epoch-"))
    after = epochs(sandbox, new_iid, new.run_id)
    assert after[0] > saved and after[-1] == 20, (saved, after)


@pytest.mark.usefixtures("template")
def test_a_stop_interrupted_run_not_backed_up_resumes_on_the_disk_ec2_restarts(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Issue 25 item 7: EC2 stopped the instance before any backup ran (the workers were busy),
    so S3 has none of the run's checkpoints; its disk does, and EC2 restarts it when capacity
    returns. The run waits for that and resumes there, from its own disk, its spot request left
    open (cancelling it would terminate the instance). The old code said it was not resumed."""
    from workers.jobs.monitor import monitor

    first, rid = spot_from_preset(svc, "spot-stop-launch"), "r-auto-stop"
    rdir = run_dir(sandbox, first, rid)
    with sandbox.metadata():
        start_busy_run(svc, sandbox, first, rid)
        sandbox.interrupt(first, "stop", after=8, restart_after=8)
        wait_for(lambda: (rdir / "spot_interruption").exists(), "the watcher to act on the notice")
        monitor(rid)  # the poll reads the notice; what it queues waits behind other jobs
        run = svc.runs.get(rid)
        assert run is not None and run.spot_notice
        wait_for(lambda: svc.fleet.get(first).state == "stopped", "EC2 to stop the instance", timeout=30)
        worker.drain(timeout=240)  # lost with the instance; waits for EC2's restart; resumes there

    old = svc.runs.get(rid)
    assert old is not None
    said = [m.text for m in slack.thread(CHANNEL, old.message_ts or "")]
    assert any(":hourglass_flowing_sand:" in t and "its disk keeps them" in t for t in said), said
    assert not any("was not resumed" in t for t in said), said
    assert not any("launched `i-" in t for t in said), said  # no replacement: the same disk
    new = svc.runs.latest(first)
    assert new is not None and new.run_id != rid and new.checkpoint_run_id == rid, said
    assert new.state is RunState.SUCCEEDED, (new, said)
    before, after = epochs(sandbox, first, rid), epochs(sandbox, first, new.run_id)
    assert after and after[-1] == 20 and 2 < after[0] <= before[-1] + 1, (before, after)
    requests = svc.fleet.ec2.describe_spot_instance_requests(Filters=[{"Name": "instance-id", "Values": [first]}])
    assert requests["SpotInstanceRequests"][0]["State"] == "active"  # left open, and EC2 restarted it
