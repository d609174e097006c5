"""Terminate goes only through the confirmation message; every click here is a
signed block_actions payload built from the message the bot posted."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rq import Queue
from rq.executions import Execution
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, TerminateCommand
from workers.jobs.terminate import terminate
from workers.queueing import QUEUES, JobPath
from workers.services import Services
from workers.slack import usergroups
from workers.slack.ids import ActionId
from workers.state.confirmations import ConfirmStore
from workers.state.runs import RunState

from .slack import click
from .test_lifecycle import (
    ALICE,
    CHANNEL,
    SLOW,
    as_dict,
    dispatch,
    posted,
    run_dir,
    send_click,
    text_of,
    train_on,
    wait_for_epoch,
)


@pytest.fixture(autouse=True)
def alice_may_terminate(svc: Services, tmp_path: Path) -> None:
    """Terminate is admins' by default; here, as in a team's policy file, role `ml` may ask for one."""
    path = tmp_path / "policy.toml"
    path.write_text('[roles]\nml = ["U0ALICE"]\n[commands]\nterminate = ["ml", "admin"]\n')
    svc.settings.RUNCTL_POLICY_FILE = path  # the app and the worker share this Settings object


def ask(iid: str, who: Actor = ALICE) -> None:
    terminate(TerminateCommand(instance_id=iid).model_dump(mode="json"), who.model_dump(mode="json"))


def confirmation(slack: FakeSlack, ts: str | None = None) -> Message:
    if ts is not None:
        return next(m for m in slack.messages(CHANNEL) if m.ts == ts)
    return posted(slack, "asks to *terminate")


def buttons(m: Message) -> list[dict[str, Any]]:
    return [e for b in m.blocks if b.get("type") == "actions" for e in b.get("elements", [])]


def count_terminate_calls(svc: Services) -> list[int]:
    calls: list[int] = []
    svc.fleet.ec2.meta.events.register("before-call.ec2.TerminateInstances", lambda **_: calls.append(1))
    return calls


def test_confirmation_shows_what_would_be_lost_and_touches_nothing(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    train_on(iid, "--epochs", "2", "--steps-per-epoch", "1", "--step-seconds", "0")
    worker.drain()
    calls = count_terminate_calls(svc)

    ask(iid)

    m = confirmation(slack)
    text = text_of(m)
    assert "gpu-box-1" in text and "g5.xlarge" in text and "`running`" in text and "<@U0ALICE>" in text
    assert "2 checkpoints" in text and "ckpt-epoch-00002.json" in text and "deletes them" in text
    assert "$1.006/h" in text and "No live run" in text
    found = {b["action_id"]: b for b in buttons(m)}
    assert set(found) == {
        ActionId.TERMINATE_CONFIRM,
        ActionId.TERMINATE_NO_BACKUP,
        ActionId.TERMINATE_STOP_INSTEAD,
        ActionId.TERMINATE_CANCEL,
    }  # checkpoints not in S3: [Terminate] backs them up first
    danger = found[ActionId.TERMINATE_CONFIRM]
    assert danger["style"] == "danger" and "confirm" in danger
    nonce = danger["value"]
    assert all(b["value"] == nonce for b in found.values()) and iid not in nonce
    record = ConfirmStore(svc.redis).peek(nonce)
    assert record is not None and record.instance_id == iid and record.requester_id == "U0ALICE"
    assert 590 <= svc.redis.ttl(f"runctl:confirm:terminate:{nonce}") <= 600
    assert calls == [] and svc.fleet.get(iid).state == "running"


def test_a_click_by_someone_else_is_refused_and_nothing_happens(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ask(iid)
    m = confirmation(slack)
    for button in (ActionId.TERMINATE_CONFIRM, ActionId.TERMINATE_CANCEL, ActionId.TERMINATE_STOP_INSTEAD):
        dispatch(svc, slack, worker, click(as_dict(m), button, "U0BOB"))
    refusals = slack.ephemerals("U0BOB")
    assert len(refusals) == 3
    assert all("nothing was done" in r.text or "admin" in r.text for r in refusals)
    assert svc.fleet.get(iid).state == "running"
    assert buttons(confirmation(slack, m.ts))  # still waiting for an answer
    assert ConfirmStore(svc.redis).peek(buttons(m)[0]["value"]) is not None


def test_two_concurrent_clicks_terminate_exactly_once_after_a_graceful_stop(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run_id = train_on(iid, *SLOW)
    wait_for_epoch(sandbox, iid, run_id, 2)
    ask(iid)
    m = confirmation(slack)
    assert "Live run `r-life-1`" in text_of(m)
    calls = count_terminate_calls(svc)

    # A double click: both requests reach the bot and both jobs run at the same time.
    for _ in range(2):
        payload = click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ADMIN")
        send_click(svc, slack, worker, payload)  # payloads differ by action_ts, as real double clicks do
    jobs = [job for name in QUEUES for job in Queue(name, connection=svc.redis).jobs]  # clicks run on the long queue
    assert len(jobs) == 2
    barrier = threading.Barrier(2)

    def perform(job: Any) -> None:
        barrier.wait()
        job.perform()

    threads = [threading.Thread(target=perform, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert len(calls) == 1
    assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
    final = confirmation(slack, m.ts)
    assert not buttons(final)
    assert "terminated by <@U0ADMIN>" in text_of(final) and "on SIGTERM" in text_of(final)
    assert any("already used" in e.text for e in slack.ephemerals("U0ADMIN"))
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED and run.ended_by == "terminate"
    assert list((run_dir(sandbox, iid, run_id) / "checkpoints").glob("ckpt-epoch-*.json"))


def test_an_expired_confirmation_is_refused(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ask(iid)
    m = confirmation(slack)
    nonce = buttons(m)[0]["value"]
    svc.redis.pexpire(f"runctl:confirm:terminate:{nonce}", 1)  # as Redis does after 10 minutes
    time.sleep(0.01)
    calls = count_terminate_calls(svc)

    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ADMIN"))

    expired = f"This confirmation expired. Run `/runctl terminate {iid}` again."
    assert any(e.text == expired for e in slack.ephemerals("U0ADMIN"))
    assert calls == [] and svc.fleet.get(iid).state == "running"
    final = confirmation(slack, m.ts)
    assert not buttons(final) and "expired" in final.text


def test_stop_instead_stops_the_instance(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    # stop is the owner's: no run has been on it, so its runctl:user tag says whose it is
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": "U0ALICE"}])
    ask(iid)
    m = confirmation(slack)
    calls = count_terminate_calls(svc)

    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_STOP_INSTEAD, "U0ALICE"))

    assert calls == [] and svc.fleet.get(iid).state == "stopped", [x.text for x in slack.messages(CHANNEL)] + [
        e.text for e in slack.ephemerals()
    ]
    final = confirmation(slack, m.ts)
    assert not buttons(final) and "chose to stop instead" in final.text
    summary = [x.text for x in slack.thread(CHANNEL, m.ts)]
    assert any("stopped *gpu-box-1" in t for t in summary), summary


def test_cancel_closes_the_message_and_says_who(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ask(iid)
    m = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CANCEL, "U0ALICE"))
    final = confirmation(slack, m.ts)
    assert not buttons(final) and "cancelled by <@U0ALICE>" in final.text
    assert svc.fleet.get(iid).state == "running"
    # a late click on the closed confirmation changes nothing
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ADMIN"))
    assert svc.fleet.get(iid).state == "running"
    assert any("already used" in e.text and "Cancel" in e.text for e in slack.ephemerals("U0ADMIN"))
    assert json.dumps(final.blocks).count("button") == 0


def test_an_admin_named_only_in_the_policy_file_or_its_user_group_confirms_a_terminate(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker, tmp_path: Path
) -> None:
    path = tmp_path / "admins.toml"
    path.write_text(
        'admins = ["U0BOSS", "S0PLATFORM"]\n[roles]\nml = ["U0ALICE"]\n[commands]\nterminate = ["ml", "admin"]\n'
    )
    svc.settings.RUNCTL_POLICY_FILE = path
    slack.add_usergroup("S0PLATFORM", ["U0CAROL"])
    usergroups.forget()
    assert "U0BOSS" not in svc.settings.RUNCTL_ADMINS and "U0CAROL" not in svc.settings.RUNCTL_ADMINS

    for admin, box in (("U0BOSS", "cpu-box"), ("U0CAROL", "gpu-box-1")):
        iid = fleet_seed.instances[box]
        ask(iid)
        m = posted(slack, f"Terminate {box} ")
        dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, admin))
        assert not slack.ephemerals(admin), [e.text for e in slack.ephemerals(admin)]
        assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
        assert f"terminated by <@{admin}> (asked by <@U0ALICE>)" in text_of(confirmation(slack, m.ts))
    usergroups.forget()


def test_a_confirmation_that_no_longer_holds_asks_again_instead_of_terminating(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    """Issue 11, finding 12: "No live run" was shown, then a run started; the click must not kill it."""
    from workers import remote

    iid = fleet_seed.instances["cpu-box"]
    ask(iid)
    m = confirmation(slack)
    assert "No live run" in text_of(m)
    run_id = train_on(iid, *SLOW, run_id="r-after-ask")
    wait_for_epoch(sandbox, iid, run_id, 1)
    calls = count_terminate_calls(svc)
    try:
        send_click(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ADMIN"))
        for job in [j for name in QUEUES for j in Queue(name, connection=svc.redis).jobs]:
            if job.func_name is not None and job.func_name.endswith("confirm_click"):
                job.perform()

        assert calls == [] and svc.fleet.get(iid).state == "running"
        run = svc.runs.get(run_id)
        assert run is not None and run.state is RunState.RUNNING
        old = confirmation(slack, m.ts)
        assert not buttons(old)
        assert "Nothing was terminated" in old.text and f"run `{run_id}` is live now" in old.text
        fresh = confirmation(slack)
        assert fresh.ts != m.ts and buttons(fresh)
        assert f"Live run `{run_id}`" in text_of(
            fresh
        ) and "It gets SIGTERM first: a script that handles it can save" in text_of(fresh)
        # the old buttons are spent
        assert ConfirmStore(svc.redis).peek(buttons(m)[0]["value"]) is None
    finally:
        svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, run_id, 10), 60)


def die_mid_job(svc: Services, path: JobPath) -> None:
    """What a worker killed while running `path`'s job leaves behind (the job started, its
    execution in the started registry), then RQ's cleanup of it once the heartbeats lapse."""
    for name in QUEUES:
        queue = Queue(name, connection=svc.redis)
        for job in queue.jobs:
            if job.func_name == path.value:
                queue.remove(job)
                with svc.redis.pipeline() as pipe:
                    job.set_status(JobStatus.STARTED, pipeline=pipe)
                    Execution.create(job, ttl=60, pipeline=pipe)
                    pipe.execute()
        StartedJobRegistry(queue=queue).cleanup(time.time() + 3600)


def test_a_worker_killed_mid_terminate_click_tells_the_clicker_in_the_thread(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    ask(iid)
    m = confirmation(slack)

    send_click(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ADMIN"))
    die_mid_job(svc, JobPath.CONFIRM_CLICK)

    told = [t.text for t in slack.thread(CHANNEL, m.ts) if "worker stopped" in t.text]
    assert told == [
        "<@U0ADMIN> runctl's worker stopped (killed or restarted) while handling your click on [Terminate], so "
        "it may be half done; runctl does not repeat it by itself. Check with `/runctl resources`, then do "
        "it again if it is needed."
    ]
    assert worker.pending() == 0 and svc.fleet.get(iid).state == "running"  # not repeated by itself
