"""A worker role without ec2:DescribeSpotPriceHistory: the cost views still answer, and the
spot instance's price says why it is unknown."""

from __future__ import annotations

import re
from typing import Any

from botocore.awsrequest import AWSResponse, HTTPHeaders

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, ResourcesCommand
from workers.jobs.sweep import sweep
from workers.queueing import enqueue_command as enqueue
from workers.services import Services

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
DENIED = "price unknown (no permission for spot prices)"


def deny_spot_prices(svc: Services) -> list[str]:
    """EC2's answer to a role without the permission: 403, Client.UnauthorizedOperation."""
    asked: list[str] = []

    def refuse(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        asked.append("DescribeSpotPriceHistory")
        error = {"Code": "UnauthorizedOperation", "Message": "You are not authorized to perform this operation."}
        return AWSResponse("https://ec2.us-east-1.amazonaws.com/", 403, HTTPHeaders(), None), {"Error": error}

    svc.fleet.ec2.meta.events.register("before-call.ec2.DescribeSpotPriceHistory", refuse)
    return asked


def spot_instance(svc: Services) -> str:
    reply = svc.fleet.ec2.run_instances(
        ImageId=AMI_ID,
        InstanceType="g5.xlarge",
        MinCount=1,
        MaxCount=1,
        InstanceMarketOptions={"MarketType": "spot"},
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "Name", "Value": "spot-box"},
                    {"Key": MANAGED_TAG, "Value": "true"},
                    {"Key": "runctl:user", "Value": "U0SPOT"},
                ],
            }
        ],
    )
    return str(reply["Instances"][0]["InstanceId"])


def test_resources_answers_with_the_spot_price_unknown_and_why(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = spot_instance(svc)
    assert svc.fleet.get(iid).lifecycle == "spot"
    asked = deny_spot_prices(svc)

    enqueue(svc.queue, ResourcesCommand(user="U0SPOT"), ALICE)  # the session's sandbox holds many boxes
    worker.drain()

    assert asked
    fleet = [m for m in slack.messages("C0TRAIN") if m.text.startswith("Fleet:")]
    assert fleet, [e.text for e in slack.ephemerals("U0ALICE")]
    row = next(
        line for b in fleet[0].blocks for line in (b.get("text") or {}).get("text", "").splitlines() if iid in line
    )
    assert DENIED in row and "price unknown so far" in row, row


def test_the_sweep_still_runs(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    spot_instance(svc)
    asked = deny_spot_prices(svc)
    outcome = sweep()
    assert asked and re.match(r"\d+ instances, \d+ warnings", outcome), outcome
