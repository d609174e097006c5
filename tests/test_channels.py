"""Channels the bot is not in. Slack posts in a public channel through chat:write.public,
refuses private channels and DMs it was not invited to, and shares files only where it is
a member; a slash command's response_url reaches the requester anywhere."""

from __future__ import annotations

import uuid
from datetime import datetime, time, timedelta
from pathlib import Path

import pytest
from rq import Queue
from rq.registry import ScheduledJobRegistry

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.commands import Actor, ResourcesCommand, TrainCommand
from workers.jobs.digest import digest
from workers.jobs.resources import resources
from workers.jobs.train import train
from workers.queueing import QUEUE, JobPath
from workers.services import Services
from workers.slack import usergroups
from workers.state.locks import train_lock
from workers.state.runs import RunState

from .conftest import sent_commands
from .fleetgen import generate, install_fleet

SECRET = "C0SECRET"  # a private channel nobody invited runctl to


@pytest.fixture
def secret(slack: FakeSlack, svc: Services) -> str:
    slack.make_private(SECRET)
    return SECRET


def requester(slack: FakeSlack, channel: str, name: str) -> Actor:
    return Actor(user_id="U0ALICE", channel_id=channel, response_url=slack.response_url(name))


def test_train_in_a_channel_that_refuses_the_bot_answers_through_response_url_and_starts_nothing(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, secret: str
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    who = requester(slack, secret, "train-secret")
    cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=("--epochs", "1"))
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"

    train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), run_id)

    [answer] = slack.responses("train-secret")
    assert "channel_not_found" in answer.text and "/invite @runctl" in answer.text
    assert "<#C0OPS>" in answer.text  # or the channel runctl posts in
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.REFUSED and run.message_ts is None
    assert sent_commands(svc, iid) == []  # nothing reached the instance
    assert train_lock(svc.redis, iid).holder() is None
    assert slack.messages(secret) == [] and slack.calls_to("chat.postMessage")[0].error == "channel_not_found"
    assert len(slack.calls_to("chat.postMessage")) == 1  # asked once, not again for each reply


def test_resources_in_a_private_channel_reach_the_requester_privately(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, secret: str
) -> None:
    resources(ResourcesCommand().model_dump(mode="json"), requester(slack, secret, "res").model_dump(mode="json"))

    [answer] = slack.responses("res")
    shown = answer.text + str(answer.blocks)
    assert "/invite @runctl" in shown and "Fleet" in shown and "running" in shown


def test_resources_csv_in_a_public_channel_the_bot_is_not_in_says_how_to_get_it(
    svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.fromisoformat("2026-03-10T12:00:00+00:00")
    svc.clock = lambda: now
    install_fleet(svc, generate(30, now))

    resources(ResourcesCommand().model_dump(mode="json"), requester(slack, "C0PUBLIC", "csv").model_dump(mode="json"))

    [parent, note] = slack.messages("C0PUBLIC")  # chat:write.public posted the listing
    assert note.thread_ts == parent.ts and "/invite @runctl" in note.text and "CSV" in note.text
    assert slack.files == []


def test_the_digest_in_a_channel_that_refuses_the_bot_is_not_lost(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, secret: str
) -> None:
    launch = svc.fleet.get(fleet_seed.instances["gpu-box-1"]).launch_time
    assert launch is not None
    now = datetime.combine(launch.date() + timedelta(days=2), time(9), launch.tzinfo)
    svc.clock = lambda: now
    svc.settings.RUNCTL_CHANNEL = secret

    assert digest().startswith("not posted: channel_not_found")

    [dm] = slack.messages("U0ADMIN")  # the admin hears why, with the fix
    assert "/invite @runctl" in dm.text and "daily digest" in dm.text
    queue = Queue(QUEUE, connection=svc.redis)
    scheduled = ScheduledJobRegistry(queue=queue).get_job_ids()  # type: ignore[no-untyped-call]
    assert [j.func_name for j in map(queue.fetch_job, scheduled) if j] == [JobPath.DIGEST.value]
    slack.join(secret)  # someone invites runctl

    digest()  # the retry

    posted = [m for m in slack.messages(secret) if m.thread_ts is None]
    assert len(posted) == 1 and "daily digest" in str(posted[0].blocks)
    assert digest() == "already posted today"
    assert len(slack.messages("U0ADMIN")) == 1


def test_admins_named_only_in_the_policy_file_hear_that_the_digest_was_refused(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, secret: str, tmp_path: Path
) -> None:
    path = tmp_path / "admins.toml"
    path.write_text('admins = ["U0BOSS", "S0PLATFORM"]\n')
    svc.settings.RUNCTL_POLICY_FILE = path
    slack.add_usergroup("S0PLATFORM", ["U0CAROL"])
    usergroups.forget()
    svc.settings.RUNCTL_CHANNEL = secret
    try:
        assert digest().startswith("not posted: channel_not_found")
    finally:
        usergroups.forget()

    for admin in ("U0ADMIN", "U0BOSS", "U0CAROL"):  # RUNCTL_ADMINS, the file, the file's user group
        [dm] = slack.messages(admin)
        assert "/invite @runctl" in dm.text and "daily digest" in dm.text
