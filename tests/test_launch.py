"""`/runctl launch`: signed slash commands and clicks through the real Bolt app, moto behind
the executing-SSM shim (whose agent registers only with an instance profile that has
AmazonSSMManagedInstanceCore), real Redis and the fake Slack."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from rq import Queue
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import LaunchSeed, Sandbox, seed_launch
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.cost.pricing import load_price_book
from workers.queueing import QUEUES, JobPath
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.autostop import AutostopStore

from .conftest import TOKEN
from .slack import click, command
from .test_lifecycle import CHANNEL, as_dict, dispatch, send_click, text_of


def launched_ids(svc: Services) -> list[str]:
    pages = svc.fleet.ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag-key", "Values": ["runctl:preset"]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )
    return [i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]]


@pytest.fixture
def template(svc: Services, sandbox: Sandbox, tmp_path: Path) -> Iterator[LaunchSeed]:
    made = seed_launch(sandbox.endpoint_url, "us-east-1")
    path = tmp_path / "launch.toml"
    path.write_text(
        f"""
[template]
ami = "{made.ami}"
subnets = ["{made.subnets[0]}", "{made.subnets[1]}"]
security_groups = ["{made.security_group}"]
instance_profile = "{made.instance_profile}"
disk_gb = 50
[presets.gpu]
instance_type = "g5.xlarge"
disk_gb = 200
[presets.big]
instance_type = "p3.2xlarge"
[limits]
user_instances = 1
user_usd_per_hour = 2
team_instances = 5
team_usd_per_hour = 20
"""
    )
    svc.settings = svc.settings.model_copy(
        update={"RUNCTL_LAUNCH_FILE": path, "RUNCTL_LAUNCH_POLL_SECONDS": 0.2, "RUNCTL_AUTOSTOP_MINUTES": 45}
    )
    yield made
    for iid in launched_ids(svc):  # moto lives for the session: leave nothing for the next test's caps
        svc.fleet.ec2.terminate_instances(InstanceIds=[iid])


def slash(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str = "U0ALICE") -> dict[str, Any]:
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user, channel=CHANNEL))
    assert resp.status == 200
    deadline = time.monotonic() + 3
    while not worker.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.drain(timeout=120)
    import json

    return json.loads(resp.body) if resp.body else {}


def confirmation(slack: FakeSlack) -> Message:
    found = [m for m in slack.messages(CHANNEL) if "asks to *launch" in text_of(m)]
    assert found, [m.text for m in slack.messages(CHANNEL)]
    return found[-1]


def current(slack: FakeSlack, ts: str) -> Message:
    return next(m for m in slack.messages(CHANNEL) if m.ts == ts)


def buttons(m: Message) -> dict[str, dict[str, Any]]:
    return {e["action_id"]: e for b in m.blocks if b.get("type") == "actions" for e in b.get("elements", [])}


def test_launch_asks_with_the_price_then_one_double_click_launches_one_tagged_ready_instance(
    svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker
) -> None:
    before = set(launched_ids(svc))
    slash(svc, slack, worker, "launch gpu --name alice-gpu")

    m = confirmation(slack)
    text = text_of(m)
    assert "alice-gpu" in text and "g5.xlarge" in text and "preset `gpu`" in text and "200 GB" in text
    assert "$1.006/h on-demand" in text and "$24.14 a day" in text  # 1.006 × 24
    assert "0 running instance(s) at $0.00/h" in text and "yours 0/1" in text
    assert set(buttons(m)) == {ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL}
    assert set(launched_ids(svc)) == before  # nothing launched before the click

    # A double click: both requests reach the bot and both jobs run at once.
    for _ in range(2):
        send_click(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
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

    new = sorted(set(launched_ids(svc)) - before)
    assert len(new) == 1, new
    iid = new[0]
    raw = svc.fleet.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags == {"Name": "alice-gpu", "runctl:user": "U0ALICE", "runctl:preset": "gpu", "runctl:managed": "true"}
    assert raw["InstanceType"] == "g5.xlarge" and raw["ImageId"] == template.ami
    assert raw["SubnetId"] == template.subnets[0] and template.instance_profile in raw["IamInstanceProfile"]["Arn"]
    assert svc.fleet.agent_status([iid]) == {iid: "Online"}

    final = current(slack, m.ts)
    assert "is ready" in final.text or "is ready" in text_of(final)
    body = text_of(final)
    assert f"alice-gpu ({iid})" in body and "SSM agent Online" in body and f"/runctl train {iid}" in body
    assert set(buttons(final)) == {ActionId.TRAIN_ON_IT}
    assert "Autostop: it stops after 45 min with no live run" in body  # RUNCTL_AUTOSTOP_MINUTES
    setting = AutostopStore(svc.redis).get(iid)
    assert setting is not None and setting.minutes == 45 and setting.thread_ts == m.ts and setting.owner == "U0ALICE"
    assert any("already used" in e.text for e in slack.ephemerals("U0ALICE"))
    assert any(f"`{iid}` is ready" in r.text for r in slack.thread(CHANNEL, m.ts))
    outcomes = [r.outcome for r in audit.newest(svc.redis, 20)]
    assert any(o.startswith("launch ready") for o in outcomes) and any("awaits confirmation" in o for o in outcomes)

    # [Train on it] answers privately with the command to copy.
    send_click(svc, slack, worker, click(as_dict(final), ActionId.TRAIN_ON_IT, "U0ALICE"))
    assert any(f"/runctl train {iid} <script.py>" in e.text for e in slack.ephemerals("U0ALICE"))


def test_a_launch_past_the_users_cap_is_refused_with_the_numbers(
    svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "launch gpu")
    dispatch(svc, slack, worker, click(as_dict(confirmation(slack)), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    assert len(launched_ids(svc)) == 1
    asked = len([m for m in slack.messages(CHANNEL) if "asks to *launch" in text_of(m)])

    slash(svc, slack, worker, "launch big")  # p3.2xlarge, $3.06/h

    refusal = slack.ephemerals("U0ALICE")[-1].text
    assert "Launch refused" in refusal
    assert "you already run 1 launched instance; the cap is 1 per person" in refusal
    table = f"price from the table of {load_price_book().as_of:%Y-%m-%d}"  # the sandbox's Price List is empty
    assert f"you would burn $4.066/h ($1.006/h now + $3.06/h {table}); the cap is $2.00/h per person" in refusal
    assert len([m for m in slack.messages(CHANNEL) if "asks to *launch" in text_of(m)]) == asked
    assert len(launched_ids(svc)) == 1
    assert any(r.decision == "refused" and "Launch refused" in r.outcome for r in audit.newest(svc.redis, 10))

    # Someone else is within their own cap.
    slash(svc, slack, worker, "launch gpu", user="U0BOB")
    assert "asks to *launch" in text_of(confirmation(slack)) and "<@U0BOB>" in text_of(confirmation(slack))


def test_free_form_types_and_unknown_presets_are_refused(
    svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "launch x2iedn.32xlarge")
    text = slack.ephemerals("U0ALICE")[-1].text
    assert "neither a preset nor an instance type you may launch" in text and "`gpu` (g5.xlarge)" in text
    slash(svc, slack, worker, "launch gpu --region eu-west-1")
    assert "only in us-east-1, not eu-west-1" in slack.ephemerals("U0ALICE")[-1].text
    assert launched_ids(svc) == []


def test_no_capacity_names_the_zones_that_offer_the_type(
    svc: Services, template: LaunchSeed, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    for zone in template.zones[:2]:
        sandbox.exhaust("g5.xlarge", zone)
    try:
        slash(svc, slack, worker, "launch gpu")
        m = confirmation(slack)
        dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    finally:
        for zone in template.zones[:2]:
            sandbox.exhaust("g5.xlarge", zone, full=False)
    final = text_of(current(slack, m.ts))
    assert f"no capacity for g5.xlarge in {template.zones[0]}, {template.zones[1]}" in final
    said = " ".join(r.text for r in slack.thread(CHANNEL, m.ts))
    assert "Offered in this region also in:" in said and template.zones[2] in said
    assert launched_ids(svc) == []


def test_cancel_launches_nothing(svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker) -> None:
    slash(svc, slack, worker, "launch gpu")
    m = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CANCEL, "U0ALICE"))
    assert "cancelled by <@U0ALICE>" in current(slack, m.ts).text and not buttons(current(slack, m.ts))
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    assert launched_ids(svc) == []


def test_a_launch_click_queued_on_terminates_path_by_the_release_before_still_launches(
    svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Launch clicks have their own job path now; RQ stores the path, so a job the release
    before queued on the shared confirmation path must still launch."""
    before = set(launched_ids(svc))
    slash(svc, slack, worker, "launch gpu --name alice-old")
    m = confirmation(slack)
    send_click(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    [job] = [j for name in QUEUES for j in Queue(name, connection=svc.redis).jobs]
    assert job.func_name == JobPath.LAUNCH_CLICK.value
    job.cancel()
    job.delete()
    Queue(job.origin, connection=svc.redis).enqueue(JobPath.CONFIRM_CLICK.value, *job.args, job_timeout=3600)
    worker.drain(timeout=120)

    [iid] = sorted(set(launched_ids(svc)) - before)
    body = text_of(current(slack, m.ts))
    assert f"alice-old ({iid})" in body and "SSM agent Online" in body and f"/runctl train {iid}" in body


def test_the_sandbox_agent_registers_only_with_the_ssm_managed_instance_core_policy(
    svc: Services, template: LaunchSeed
) -> None:
    ec2 = svc.fleet.ec2
    ids = {}
    for profile in (template.instance_profile, template.bare_profile):
        made = ec2.run_instances(
            ImageId=template.ami,
            InstanceType="t3.medium",
            MinCount=1,
            MaxCount=1,
            IamInstanceProfile={"Name": profile},
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "runctl:preset", "Value": "t"}]}],
        )
        ids[profile] = made["Instances"][0]["InstanceId"]
    status = svc.fleet.agent_status(list(ids.values()))
    assert status == {ids[template.instance_profile]: "Online"}  # the bare one never registers


def test_spot_launch_quotes_the_zones_spot_price_and_asks_for_a_stoppable_request(
    svc: Services, template: LaunchSeed, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "launch gpu --spot")
    m = confirmation(slack)
    assert f"$0.00001/h spot in {template.zones[0]}" in text_of(m)  # moto's spot price history
    sent: list[dict[str, Any]] = []
    svc.fleet.session.events.register("provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(params))
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    (iid,) = launched_ids(svc)
    raw = svc.fleet.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert raw.get("InstanceLifecycle") == "spot"
    assert "is ready" in text_of(current(slack, m.ts))
    options = sent[0]["InstanceMarketOptions"]["SpotOptions"]  # a one-time spot instance could not be stopped
    assert options == {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}


def test_a_launch_whose_agent_never_comes_says_launched_but_with_the_id_and_leaves_autostop_set(
    svc: Services,
    template: LaunchSeed,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A private subnet without NAT or endpoints: the agent registers long after runctl stops waiting.
    monkeypatch.setattr(sandbox, "agent_online_after", 600.0)
    monkeypatch.setattr("workers.aws.fleet.AGENT_WAIT_SECONDS", 1)
    before = set(launched_ids(svc))
    slash(svc, slack, worker, "launch gpu --name alice-private")
    m = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))

    [iid] = sorted(set(launched_ids(svc)) - before)
    state = svc.fleet.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"  # it bills
    final = text_of(current(slack, m.ts))
    assert "did not happen" not in final
    assert "launched but" in final and f"`{iid}` is running and billing" in final and "after 45 min" in final
    said = " ".join(r.text for r in slack.thread(CHANNEL, m.ts)) + " ".join(e.text for e in slack.ephemerals("U0ALICE"))
    assert "launched but" in said and "AmazonSSMManagedInstanceCore" in said and "ssmmessages" in said
    assert f"/runctl status {iid}" in said and f"/runctl terminate {iid}" in said
    setting = AutostopStore(svc.redis).get(iid)
    assert setting is not None and setting.minutes == 45 and setting.owner == "U0ALICE"


def test_a_profile_whose_role_cannot_register_the_agent_is_refused_before_the_click(
    svc: Services, template: LaunchSeed, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    """An instance whose role lacks the SSM agent's permissions runs and bills while nothing can
    train on it: a role with no policy is refused before [Launch]; one with only its own policies
    gets a warning on the confirmation (they may grant what the agent needs)."""
    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None
    good = path.read_text()
    path.write_text(good.replace(template.instance_profile, template.bare_profile))
    slash(svc, slack, worker, "launch gpu")
    said = slack.ephemerals("U0ALICE")[-1].text
    assert f"role `{template.bare_profile}` has no policies" in said, said
    assert f"aws iam attach-role-policy --role-name {template.bare_profile}" in said
    assert not [m for m in slack.messages(CHANNEL) if "asks to *launch" in text_of(m)]

    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    iam.put_role_policy(
        RoleName=template.bare_profile,
        PolicyName="own",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}',
    )
    slash(svc, slack, worker, "launch gpu")
    asks = text_of(confirmation(slack))
    assert f"role `{template.bare_profile}` does not have AmazonSSMManagedInstanceCore" in asks, asks

    path.write_text(good)  # AmazonSSMManagedInstanceCore: no note
    slash(svc, slack, worker, "launch gpu --name alice-ok")
    assert "does not have AmazonSSMManagedInstanceCore" not in text_of(confirmation(slack))
    assert launched_ids(svc) == []
