"""Generated fleets for the tests that need hundreds of instances (moto takes
half a minute to create 500). They are served as real DescribeInstances pages from a
botocore `before-call` hook on the fleet's EC2 client (as bench/sweep_10k.py does), so
the client, its paginator and `Fleet.iter_instances` run as in production."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from botocore.awsrequest import AWSResponse, HTTPHeaders

from workers.aws.instance import Instance
from workers.services import Services
from workers.state.uptime import UptimeLedger

TYPES = ("g5.xlarge", "p3.2xlarge", "t3.medium", "m5.large", "x9.mystery")  # the last has no price
PAGE = 1000  # EC2's largest MaxResults


def generate(n: int, now: datetime, region: str = "us-east-1") -> list[Instance]:
    fleet = []
    for i in range(n):
        state = "stopped" if i % 10 == 9 else "running"
        fleet.append(
            Instance(
                id=f"i-{i:017x}",
                type=TYPES[i % len(TYPES)],
                state=state,
                region=region,
                name=f"box-{i:03d}-" + "x" * 40,  # long names push the text limits
                launch_time=now - timedelta(hours=1 + i % 50),
                availability_zone=f"{region}a",
                tags={"runctl:managed": "true", "runctl:user": f"U0USER{i % 37:02d}"},
            )
        )
    return fleet


def raw(inst: Instance) -> dict[str, Any]:
    """An instance as DescribeInstances answers it (the fields runctl reads)."""
    tags = {**inst.tags, "Name": inst.name} if inst.name else dict(inst.tags)
    out: dict[str, Any] = {
        "InstanceId": inst.id,
        "InstanceType": inst.type,
        "State": {"Name": inst.state},
        "Placement": {"AvailabilityZone": inst.availability_zone},
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }
    if inst.launch_time is not None:
        out["LaunchTime"] = inst.launch_time
    if inst.lifecycle != "on-demand":
        out["InstanceLifecycle"] = inst.lifecycle
    return out


def _numbered(body: Mapping[str, Any], prefix: str) -> list[str]:
    """The query protocol's list `Prefix.1`, `Prefix.2`, … in order."""
    values = []
    i = 1
    while f"{prefix}.{i}" in body:
        values.append(str(body[f"{prefix}.{i}"]))
        i += 1
    return values


class DescribePages:
    """Answers DescribeInstances from a generated fleet, page by page, honouring the tag
    filters and instance ids as EC2 does; a call naming an instance the fleet does not hold
    goes on to moto."""

    def __init__(self, fleet: list[Instance]) -> None:
        self.fleet = fleet
        self.by_id = {inst.id: inst for inst in fleet}

    def __call__(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        body: Mapping[str, Any] = params["body"]
        ids = _numbered(body, "InstanceId")
        if ids and not all(i in self.by_id for i in ids):
            return None
        chosen = [self.by_id[i] for i in ids] if ids else self.fleet
        i = 1
        while f"Filter.{i}.Name" in body:
            name, values = str(body[f"Filter.{i}.Name"]), _numbered(body, f"Filter.{i}.Value")
            if not name.startswith("tag:"):
                raise AssertionError(f"fleetgen serves tag filters only, not {name}")
            chosen = [inst for inst in chosen if inst.tags.get(name[4:]) in values]
            i += 1
        start = int(body.get("NextToken", 0))
        end = min(len(chosen), start + int(body.get("MaxResults", PAGE)))
        page: dict[str, Any] = {
            "Reservations": [{"Instances": [raw(inst) for inst in chosen[start:end]]}] if end > start else [],
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }
        if end < len(chosen):
            page["NextToken"] = str(end)
        return AWSResponse("https://ec2.fleetgen.invalid", 200, HTTPHeaders(), None), page


def install_fleet(svc: Services, fleet: list[Instance]) -> None:
    """Serve ``fleet`` to the services' EC2 clients (per region); uptime is recorded as a sweep would."""
    ledger = UptimeLedger(svc.redis, svc.clock)
    for inst in fleet:
        if inst.state == "running" and inst.launch_time is not None:
            ledger.mark_running(inst.id, inst.launch_time)
    by_region: dict[str, list[Instance]] = {}
    for inst in fleet:
        by_region.setdefault(inst.region, []).append(inst)
    for region, instances in by_region.items():  # each region's EC2 client answers its own
        ec2 = svc.fleet.client("ec2", region)
        ec2.meta.events.register("before-call.ec2.DescribeInstances", DescribePages(instances))
