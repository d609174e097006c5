"""One fleet across regions (RUNCTL_REGIONS): an instance in the second region is found,
trained on, stopped and listed, its EC2 and SSM calls sent to that region and priced at
that region's rate. moto serves each region apart (by the SigV4 scope), like AWS."""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo, seed
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.jobs.monitor import monitor
from workers.services import Services
from workers.state.runs import RunState

from .test_launch import launched_ids, slash, template  # noqa: F401 (template: a fixture)
from .test_lifecycle import CHANNEL, SLOW, posted, stop_cmd, text_of, train_on, wait_for_epoch
from .test_resources import text_of as listing_text

SECOND = "eu-west-1"


@pytest.fixture
def europe(svc: Services, sandbox: Sandbox, fleet_seed: SeedInfo) -> Iterator[SeedInfo]:
    """The seed fleet again in eu-west-1, with runctl watching both regions."""
    info = seed(sandbox.endpoint_url, SECOND, f"runctl-test-eu-{os.urandom(3).hex()}")  # bundles use the one bucket
    svc.settings = svc.settings.model_copy(update={"RUNCTL_REGIONS": ["us-east-1", SECOND]})
    svc._fleet = None
    yield info
    boto3.client("ec2", region_name=SECOND).terminate_instances(InstanceIds=list(info.instances.values()))
    svc.fleet.ec2.terminate_instances(InstanceIds=list(fleet_seed.instances.values()))


def state_in_europe(iid: str) -> str:
    raw = boto3.client("ec2", region_name=SECOND).describe_instances(InstanceIds=[iid])
    return str(raw["Reservations"][0]["Instances"][0]["State"]["Name"])


def test_status_train_stop_and_resources_on_an_instance_in_the_second_region(
    svc: Services, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker, europe: SeedInfo, fleet_seed: SeedInfo
) -> None:
    iid = europe.instances["gpu-box-1"]
    home = fleet_seed.instances["gpu-box-1"]

    slash(svc, slack, worker, f"status {iid}")
    status = slack.ephemerals("U0ALICE")[-1].text
    assert status.startswith(f"*gpu-box-1 ({iid})* · g5.xlarge · {SECOND} · `running`"), status

    run_id = train_on(iid, *SLOW)
    wait_for_epoch(sandbox, iid, run_id, 2)
    assert monitor(run_id) == "polled 1"
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING, run
    # The scripts ran on the European instance, whose agent names its region.
    assert sandbox.sent_scripts(iid) and not any(run_id in s for s in sandbox.sent_scripts(home))

    stop_cmd(iid)
    assert state_in_europe(iid) == "stopped"
    text = text_of(posted(slack, "stopped *gpu-box-1"))
    assert "$1.123/h" in text, text  # eu-west-1's g5.xlarge rate, not us-east-1's $1.006/h
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED and run.checkpoint is not None

    slash(svc, slack, worker, "resources")
    listing = listing_text(slack.messages(CHANNEL)[-1])
    lines = listing.splitlines()
    eu_box = next(ln for ln in lines if europe.instances["gpu-box-2"] in ln)
    us_box = next(ln for ln in lines if fleet_seed.instances["gpu-box-2"] in ln)
    assert "$3.305/h" in eu_box and "$3.06/h" in us_box, (eu_box, us_box)  # p3.2xlarge in each region
    regions = [ln for ln in lines if ln.startswith("*us-east-1*") or ln.startswith(f"*{SECOND}*")]
    assert regions == [f"*{SECOND}* · 2 running of 2 · $3.35/h", "*us-east-1* · 3 running of 3 · $4.11/h"], listing


def test_sweep_and_digest_cover_both_regions(
    svc: Services, slack: FakeSlack, europe: SeedInfo, fleet_seed: SeedInfo
) -> None:
    from datetime import timedelta

    from workers.cost import fleetview
    from workers.jobs.digest import spend
    from workers.jobs.sweep import sweep
    from workers.slack.messages.digest import render

    eu, us = europe.instances["gpu-box-1"], fleet_seed.instances["gpu-box-1"]
    t0 = svc.clock()
    fleetview.view(svc, t0)  # the ledger sees both regions' instances start running now
    svc.clock = lambda: t0 + timedelta(hours=2)
    sweep()  # idle for 2 h > RUNCTL_IDLE_MINUTES: warned, wherever the instance is
    idle = [listing_text(m) for m in slack.messages("C0OPS") if "idle for" in listing_text(m)]
    assert any(eu in t and SECOND in t and "$1.123/h" in t for t in idle), idle
    assert any(us in t and "us-east-1" in t and "$1.006/h" in t for t in idle), idle

    rows = fleetview.view(svc, svc.clock())
    day = spend(svc, rows, {}, t0, t0 + timedelta(hours=2), svc.clock())
    _, blocks = render(rows, day, day, [], svc.clock())
    shown = "\n".join(b.to_dict()["text"]["text"] for b in blocks if "text" in b.to_dict())
    assert "*Per region*" in shown and f"*{SECOND}* — yesterday" in shown and "*us-east-1* — yesterday" in shown


@pytest.mark.usefixtures("template")  # the launch file (tests/test_launch.py)
def test_launch_is_refused_when_the_workers_region_is_not_managed(
    svc: Services, slack: FakeSlack, worker: InlineWorker
) -> None:
    svc.settings = svc.settings.model_copy(update={"RUNCTL_REGIONS": [SECOND]})
    svc._fleet = None
    slash(svc, slack, worker, "launch gpu")
    said = slack.ephemerals("U0ALICE")[-1].text
    assert f"runctl launches in us-east-1, but RUNCTL_REGIONS ({SECOND}) leaves it out" in said, said
    assert launched_ids(svc) == []
