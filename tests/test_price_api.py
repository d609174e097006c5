"""On-demand prices from the Price List API (pricing:GetProducts), cached in Redis for a
day, with the shipped table (and its date) as the fallback; unknown stays unknown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from scripts import update_prices
from workers.commands import Actor, ResourcesCommand
from workers.cost.pricing import ON_DEMAND_CACHE_SECONDS, load_price_book
from workers.jobs.resources import resources
from workers.services import Services

from .test_resources import text_of

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")


@pytest.fixture(autouse=True)
def price_list(sandbox: Sandbox) -> Iterator[None]:
    sandbox.prices.reset()
    yield
    sandbox.prices.reset()


def lines(svc: Services, slack: FakeSlack, *instance_ids: str) -> list[str]:
    # moto keeps other tests' instances: these are the ones owned by U0PRICE.
    svc.fleet.ec2.create_tags(Resources=list(instance_ids), Tags=[{"Key": "runctl:user", "Value": "U0PRICE"}])
    resources(ResourcesCommand(all=True, user="U0PRICE").model_dump(mode="json"), ALICE.model_dump(mode="json"))
    shown = text_of(slack.messages("C0TRAIN")[-1]).splitlines()
    return [next(ln for ln in shown if iid in ln) for iid in instance_ids]


def test_price_comes_from_the_price_list_api_and_the_table_is_the_dated_fallback(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    odd = svc.fleet.ec2.run_instances(
        ImageId=AMI_ID,
        InstanceType="x2iedn.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": MANAGED_TAG, "Value": "true"}]}],
    )["Instances"][0]["InstanceId"]
    sandbox.prices.set("us-east-1", "g5.xlarge", "0.9130000000")  # AWS's price today, not the table's 1.006
    gpu, cpu = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    as_of = f"{load_price_book().as_of:%Y-%m-%d}"

    gpu_line, cpu_line, odd_line = lines(svc, slack, gpu, cpu, odd)

    assert "$0.913/h" in gpu_line and "table of" not in gpu_line
    assert f"$0.0416/h (table of {as_of})" in cpu_line  # the API has no t3.medium: the table answers
    assert "price unknown" in odd_line and "$0.00" not in odd_line  # neither knows it
    cached = "runctl:price:on-demand:us-east-1:g5.xlarge"
    assert svc.redis.get(cached) == b"0.913"
    assert ON_DEMAND_CACHE_SECONDS - 60 < svc.redis.ttl(cached) <= ON_DEMAND_CACHE_SECONDS

    calls = sandbox.prices.calls
    lines(svc, slack, gpu, cpu)
    assert sandbox.prices.calls == calls  # a day's cache: no second round of GetProducts
    svc.fleet.terminate(odd)  # later tests list the running fleet


def test_a_denied_price_list_falls_back_to_the_table_with_its_date(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    sandbox.prices.set("us-east-1", "g5.xlarge", "0.913")
    sandbox.prices.denied = True  # the worker's role lacks pricing:GetProducts
    (gpu_line,) = lines(svc, slack, fleet_seed.instances["gpu-box-1"])
    assert f"$1.006/h (table of {load_price_book().as_of:%Y-%m-%d})" in gpu_line
    assert 0 < svc.redis.ttl("runctl:price:on-demand:us-east-1:g5.xlarge") <= 600  # asks again soon


def test_the_shipped_table_is_what_update_prices_makes_of_the_sandboxs_price_list(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.prices.publish_catalogue()
    out = tmp_path / "prices.json"

    assert update_prices.main(["--endpoint-url", sandbox.endpoint_url, "--output", str(out)]) == 0

    shipped = json.loads(update_prices.DEFAULT_OUTPUT.read_text(encoding="utf-8"))
    assert json.loads(out.read_text())["regions"] == shipped["regions"]
    assert "sandbox's Price List" in shipped["source"]  # it says where its figures come from
