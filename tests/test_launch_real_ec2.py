"""`/runctl launch` against EC2 as a real account answers (issue 25, items 3 and 5): the AMI's
own root device, a zone that does not offer the type, the account's vCPU quotas, and the first
spot launch's service-linked role. Signed commands and clicks through the real Bolt app, real
RQ (InlineWorker), moto behind the sandbox's EC2 and SSM fakes, real Redis and the fake Slack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runctl_sandbox.aws import AMAZON_LINUX_AMI_ID, LaunchSeed, Sandbox
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.services import Services
from workers.slack.ids import ActionId

from .slack import click
from .test_launch import confirmation, current, launched_ids, slash, template  # noqa: F401 (template: a fixture)
from .test_lifecycle import CHANNEL, as_dict, dispatch, text_of


def launch_click(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str) -> str:
    """`/runctl <text>`, then [Launch]: everything Slack shows about it afterwards."""
    slash(svc, slack, worker, text)
    m = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(m), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    return " ".join([text_of(current(slack, m.ts)), *(r.text for r in slack.thread(CHANNEL, m.ts))])


def volumes(svc: Services, iid: str) -> dict[str, int]:
    """Device name -> size in GB of every volume attached to ``iid``."""
    raw = svc.fleet.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    ids = {m["Ebs"]["VolumeId"]: m["DeviceName"] for m in raw["BlockDeviceMappings"]}
    found = svc.fleet.ec2.describe_volumes(VolumeIds=list(ids))["Volumes"]
    return {ids[v["VolumeId"]]: v["Size"] for v in found}


@pytest.fixture
def amazon_linux(svc: Services, template: LaunchSeed) -> Iterator[LaunchSeed]:  # noqa: F811
    """The launch template with an Amazon Linux Deep Learning AMI, whose root is /dev/xvda."""
    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None
    moved = path.with_name("launch-al.toml")
    moved.write_text(path.read_text().replace(template.ami, AMAZON_LINUX_AMI_ID))
    svc.settings = svc.settings.model_copy(update={"RUNCTL_LAUNCH_FILE": moved})
    yield template


def test_the_sandbox_keeps_the_amis_root_and_adds_a_volume_for_another_device_name(
    svc: Services,
    template: LaunchSeed,  # noqa: F811
) -> None:
    image = svc.fleet.ec2.describe_images(ImageIds=[AMAZON_LINUX_AMI_ID])["Images"][0]
    assert image["RootDeviceName"] == "/dev/xvda"
    made = svc.fleet.ec2.run_instances(
        ImageId=AMAZON_LINUX_AMI_ID,
        InstanceType="t3.medium",
        MinCount=1,
        MaxCount=1,
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200, "DeleteOnTermination": True}}],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "runctl:preset", "Value": "t"}]}],
    )
    iid = made["Instances"][0]["InstanceId"]
    assert volumes(svc, iid) == {"/dev/xvda": 15, "/dev/sda1": 200}  # as EC2 does: the root stays the AMI's size


@pytest.mark.usefixtures("amazon_linux")
def test_a_launch_from_an_amazon_linux_ami_gets_one_root_volume_of_the_asked_size(
    svc: Services, slack: FakeSlack, worker: InlineWorker
) -> None:
    said = launch_click(svc, slack, worker, "launch gpu --name al-gpu")

    assert "is ready" in said, said
    (iid,) = launched_ids(svc)
    assert volumes(svc, iid) == {"/dev/xvda": 200}  # the preset's 200 GB is the root, and no empty extra disk


def test_a_zone_that_does_not_offer_the_type_moves_on_to_the_next_subnet(
    svc: Services,
    template: LaunchSeed,  # noqa: F811
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
) -> None:
    sandbox.unsupported("g5.xlarge", template.zones[0])
    try:
        said = launch_click(svc, slack, worker, "launch gpu")
    finally:
        sandbox.unsupported("g5.xlarge", template.zones[0], on=False)

    assert "is ready" in said and template.zones[1] in said, said
    (iid,) = launched_ids(svc)
    raw = svc.fleet.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert raw["SubnetId"] == template.subnets[1]


def test_zones_that_all_refuse_say_so_and_name_the_zones_that_offer_the_type(
    svc: Services,
    template: LaunchSeed,  # noqa: F811
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
) -> None:
    sandbox.unsupported("g5.xlarge", template.zones[0])
    sandbox.exhaust("g5.xlarge", template.zones[1])
    try:
        said = launch_click(svc, slack, worker, "launch gpu")
    finally:
        sandbox.unsupported("g5.xlarge", template.zones[0], on=False)
        sandbox.exhaust("g5.xlarge", template.zones[1], full=False)

    assert f"no capacity for g5.xlarge in {template.zones[1]}" in said, said
    assert f"g5.xlarge is not offered in {template.zones[0]}" in said
    assert "Offered in this region also in:" in said and "Unsupported" not in said
    assert launched_ids(svc) == []


@pytest.mark.parametrize(
    ("code", "text", "quota", "name"),
    [
        ("VcpuLimitExceeded", "launch gpu", "L-DB2E81BA", "Running On-Demand G and VT instances"),
        ("MaxSpotInstanceCountExceeded", "launch gpu --spot", "L-3819A6DF", "All G and VT Spot Instance Requests"),
    ],
)
def test_a_used_up_vcpu_quota_names_the_quota_and_how_to_raise_it(
    svc: Services,
    template: LaunchSeed,  # noqa: F811
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
    code: str,
    text: str,
    quota: str,
    name: str,
) -> None:
    sandbox.account_limit(code)
    try:
        said = launch_click(svc, slack, worker, text)
    finally:
        sandbox.account_limit(code, on=False)

    kind = "spot" if "--spot" in text else "on-demand"
    assert f"this account's {kind} vCPU quota in us-east-1 for g5.xlarge is used up; nothing was launched" in said
    assert f"“{name}”" in said and "Service Quotas console → AWS services → Amazon Elastic Compute Cloud" in said
    assert (
        f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {quota} "
        "--desired-value 4 --region us-east-1"
    ) in said, said
    assert f"AWS error while trying to launch a g5.xlarge: {code}" not in said
    assert launched_ids(svc) == []


def test_a_first_spot_launch_without_the_service_linked_role_right_says_the_fix(
    svc: Services,
    template: LaunchSeed,  # noqa: F811
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
) -> None:
    sandbox.account_limit("AuthFailure.ServiceLinkedRoleCreationNotPermitted")
    try:
        said = launch_click(svc, slack, worker, "launch gpu --spot")
    finally:
        sandbox.account_limit("AuthFailure.ServiceLinkedRoleCreationNotPermitted", on=False)

    assert "may not create the Spot service-linked role; nothing was launched" in said, said
    assert "`iam:CreateServiceLinkedRole` for `AWSServiceRoleForEC2Spot`" in said
    assert "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com" in said
    assert launched_ids(svc) == []
