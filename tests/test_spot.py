"""Spot instances: a one-time one cannot be stopped (AWS says UnsupportedOperation),
so stop refuses before touching the run; a persistent one stops like any other."""

from __future__ import annotations

from typing import Any

import pytest

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.services import Services
from workers.state.runs import RunState

from .test_lifecycle import SLOW, run_dir, stop_cmd, text_of, train_on, wait_for_epoch


def spot_instance(svc: Services, kind: str, name: str) -> str:
    extra: dict[str, Any] = {"InstanceInterruptionBehavior": "stop"} if kind == "persistent" else {}
    ec2 = svc.fleet.ec2
    request = ec2.request_spot_instances(
        InstanceCount=1, Type=kind, LaunchSpecification={"ImageId": AMI_ID, "InstanceType": "g5.xlarge"}, **extra
    )["SpotInstanceRequests"][0]
    described = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request["SpotInstanceRequestId"]])
    iid = str(described["SpotInstanceRequests"][0]["InstanceId"])
    ec2.create_tags(Resources=[iid], Tags=[{"Key": MANAGED_TAG, "Value": "true"}, {"Key": "Name", "Value": name}])
    return iid


def test_the_sandbox_refuses_to_stop_a_one_time_spot_instance_like_aws(svc: Services, fleet_seed: SeedInfo) -> None:
    from botocore.exceptions import ClientError

    iid = spot_instance(svc, "one-time", "spot-raw")
    with pytest.raises(ClientError) as err:
        svc.fleet.ec2.stop_instances(InstanceIds=[iid])
    assert err.value.response["Error"]["Code"] == "UnsupportedOperation"
    assert "one-time Spot Instance request" in err.value.response["Error"]["Message"]
    assert svc.fleet.get(iid).state == "running"
    svc.fleet.terminate(iid)  # later tests list the running fleet


def test_stopping_a_one_time_spot_instance_is_refused_before_the_run_is_touched(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = spot_instance(svc, "one-time", "spot-once")
    run_id = train_on(iid, *SLOW, run_id="r-spot-once")
    wait_for_epoch(sandbox, iid, run_id, 1)
    scripts_before = len(sandbox.sent_scripts(iid))

    stop_cmd(iid)

    told = [e.text for e in slack.ephemerals("U0ALICE")] + [text_of(m) for m in slack.messages("C0TRAIN")]
    refusal = next(t for t in told if "one-time spot instance" in t)
    assert f"/runctl terminate {iid}" in refusal and "keep it running" in refusal
    assert "did not touch run `r-spot-once`" in refusal
    # nothing reached the instance: no SIGTERM, the training goes on, the instance runs
    assert len(sandbox.sent_scripts(iid)) == scripts_before
    assert not (run_dir(sandbox, iid, run_id) / "exit_code").exists()
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING
    assert svc.fleet.get(iid).state == "running"
    svc.fleet.terminate(iid)


def test_a_persistent_spot_instance_stops_and_says_how_it_comes_back(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    iid = spot_instance(svc, "persistent", "spot-kept")
    run_id = train_on(iid, *SLOW, run_id="r-spot-kept")
    wait_for_epoch(sandbox, iid, run_id, 1)

    stop_cmd(iid)

    assert svc.fleet.get(iid).state == "stopped"
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED
    summary = next(text_of(m) for m in slack.messages("C0TRAIN") if "stopped *spot-kept" in text_of(m))
    assert "spot" in summary and f"/runctl start {iid}" in summary and "capacity" in summary
