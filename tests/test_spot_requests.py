"""Persistent spot requests outlive their instance: EC2 launches a new, untagged instance for an
open one after its instance is terminated. [Terminate] and `--then terminate` cancel it first,
and say so; a request that cannot be cancelled stops the terminate, loudly, with the fix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.services import Services
from workers.slack.ids import ActionId

from .slack import click
from .test_launch import slash
from .test_lifecycle import CHANNEL, as_dict, dispatch, text_of
from .test_terminate import ask, confirmation

RELAUNCH = 0.3  # the sandbox's EC2 fulfils a reopened request after this many seconds


@pytest.fixture(autouse=True)
def fast_relaunch(svc: Services, sandbox: Sandbox, tmp_path: Path) -> Iterator[None]:
    """Alice may terminate (as in a team's policy file); EC2 relaunches within a test's time."""
    path = tmp_path / "policy.toml"
    path.write_text('[roles]\nml = ["U0ALICE"]\n[commands]\nterminate = ["ml", "admin"]\n')
    svc.settings.RUNCTL_POLICY_FILE = path
    before = sandbox.spot_requests.relaunch_seconds
    sandbox.spot_requests.relaunch_seconds = RELAUNCH
    yield
    sandbox.spot_requests.relaunch_seconds = before


def persistent_spot(svc: Services, name: str) -> str:
    """Launched as `Launcher.run` launches `--spot`: RunInstances with a persistent spot request."""
    reply = svc.fleet.ec2.run_instances(
        ImageId=AMI_ID,
        InstanceType="g5.xlarge",
        MinCount=1,
        MaxCount=1,
        InstanceMarketOptions={
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
        },
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": MANAGED_TAG, "Value": "true"},
                    {"Key": "Name", "Value": name},
                    {"Key": "runctl:user", "Value": "U0ALICE"},
                ],
            }
        ],
    )
    return str(reply["Instances"][0]["InstanceId"])


def running_ids(svc: Services) -> set[str]:
    """Every running instance in the account, tagged or not (runctl's own listings see only its tag)."""
    pages = svc.fleet.ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
    return {i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]}


def request_of(svc: Services, iid: str) -> dict[str, Any]:
    found = svc.fleet.ec2.describe_spot_instance_requests(Filters=[{"Name": "instance-id", "Values": [iid]}])
    requests: list[dict[str, Any]] = found["SpotInstanceRequests"]
    assert len(requests) == 1, requests
    return requests[0]


def relaunched(svc: Services, before: set[str]) -> set[str]:
    """What EC2 launched after `before` was taken, once a relaunch would have happened."""
    time.sleep(RELAUNCH * 5)
    return running_ids(svc) - before


def test_the_sandbox_relaunches_an_untagged_instance_for_an_open_persistent_request(
    svc: Services, fleet_seed: SeedInfo
) -> None:
    iid = persistent_spot(svc, "spot-raw-relaunch")
    rid = request_of(svc, iid)["SpotInstanceRequestId"]
    before = running_ids(svc)
    svc.fleet.ec2.terminate_instances(InstanceIds=[iid])
    new = relaunched(svc, before)
    assert len(new) == 1, new
    (nid,) = new
    request = svc.fleet.ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[rid])["SpotInstanceRequests"][0]
    assert request["State"] == "active" and request["InstanceId"] == nid
    described = svc.fleet.ec2.describe_instances(InstanceIds=[nid])["Reservations"][0]["Instances"][0]
    assert not described.get("Tags") and described["InstanceLifecycle"] == "spot"
    svc.fleet.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[rid])
    svc.fleet.ec2.terminate_instances(InstanceIds=[nid])
    assert not relaunched(svc, running_ids(svc))


def test_terminate_cancels_the_spot_request_first_so_no_instance_comes_back(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = persistent_spot(svc, "spot-gone")
    rid = request_of(svc, iid)["SpotInstanceRequestId"]
    ask(iid)
    m = confirmation(slack)
    before = running_ids(svc)

    dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ALICE"))

    assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
    assert not relaunched(svc, before)  # on the old code: one new, untagged g5.xlarge, billing
    assert request_of(svc, iid)["State"] == "cancelled"
    said = [text_of(x) for x in slack.thread(CHANNEL, m.ts)] + [text_of(confirmation(slack, m.ts))]
    assert any("terminated by <@U0ALICE>" in t and f"spot request `{rid}` was cancelled" in t for t in said), said


def test_a_request_that_cannot_be_cancelled_stops_the_terminate_with_the_fix(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = persistent_spot(svc, "spot-denied-cancel")
    rid = request_of(svc, iid)["SpotInstanceRequestId"]
    ask(iid)
    m = confirmation(slack)

    def deny(**_: Any) -> None:
        from botocore.exceptions import ClientError

        error = {"Error": {"Code": "UnauthorizedOperation", "Message": "not authorized"}}
        raise ClientError(error, "CancelSpotInstanceRequests")  # type: ignore[arg-type]

    svc.fleet.ec2.meta.events.register("before-call.ec2.CancelSpotInstanceRequests", deny)
    try:
        dispatch(svc, slack, worker, click(as_dict(m), ActionId.TERMINATE_CONFIRM, "U0ALICE"))
    finally:
        svc.fleet.ec2.meta.events.unregister("before-call.ec2.CancelSpotInstanceRequests", deny)

    assert svc.fleet.get(iid).state == "running"
    assert request_of(svc, iid)["State"] == "active"
    said = [text_of(x) for x in slack.thread(CHANNEL, m.ts)] + [text_of(confirmation(slack, m.ts))]
    loud = next((t for t in said if "could not be cancelled" in t), None)
    assert loud is not None, said
    assert f"aws ec2 cancel-spot-instance-requests --region us-east-1 --spot-instance-request-ids {rid}" in loud
    assert "ec2:CancelSpotInstanceRequests" in loud and f"/runctl terminate {iid}" in loud
    svc.fleet.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[rid])
    svc.fleet.ec2.terminate_instances(InstanceIds=[iid])


def test_then_terminate_cancels_the_spot_request_and_says_so(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = persistent_spot(svc, "spot-then")
    rid = request_of(svc, iid)["SpotInstanceRequestId"]
    before = running_ids(svc)
    slash(
        svc,
        slack,
        worker,
        f"train {iid} train_with_checkpoints.py --then terminate -- --epochs 1 --steps-per-epoch 1 --step-seconds 0",
    )

    assert svc.fleet.get(iid).state in ("shutting-down", "terminated")
    assert not relaunched(svc, before - {iid})  # on the old code: a new, untagged instance
    assert request_of(svc, iid)["State"] == "cancelled"
    run = svc.runs.latest(iid)
    assert run is not None
    said = [text_of(x) for x in slack.thread(CHANNEL, run.message_ts or "")]
    assert any("was terminated (`--then terminate`)" in t and f"`{rid}` was cancelled" in t for t in said), said


def wait_state(svc: Services, iid: str, state: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while svc.fleet.get(iid).state != state:
        assert time.monotonic() < deadline, f"{iid} never became {state}: {svc.fleet.get(iid).state}"
        time.sleep(0.1)


def test_the_sandbox_stops_an_interrupted_instance_after_the_notice_and_restarts_it_later(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox
) -> None:
    """EC2 user guide, "Behavior of Spot Instance interruptions": stop-type, persistent request;
    only EC2 restarts it, when capacity returns; cancelling the request terminates it while stopped."""
    iid, other = persistent_spot(svc, "spot-interrupted"), persistent_spot(svc, "spot-cancelled")
    with sandbox.metadata():
        notice = sandbox.interrupt(iid, "stop", after=0.5, restart_after=1.0)
        sandbox.interrupt(other, "stop", after=0.5, restart_after=1.0)
        assert notice["action"] == "stop"
        assert svc.fleet.get(iid).state == "running"  # the notice gives (scaled) time
        wait_state(svc, iid, "stopped")
        assert request_of(svc, iid)["State"] == "disabled"
        wait_state(svc, other, "stopped")
        svc.fleet.ec2.cancel_spot_instance_requests(
            SpotInstanceRequestIds=[request_of(svc, other)["SpotInstanceRequestId"]]
        )
        wait_state(svc, iid, "running")
        assert request_of(svc, iid)["State"] == "active"
        time.sleep(1.5)
        assert svc.fleet.get(other).state in ("shutting-down", "terminated")
    svc.fleet.terminate(iid)
