"""Generated fleets for the tests that need hundreds of instances (moto takes
half a minute to create 500); they enter our code where describe's output does."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from workers.aws.fleet import Instance
from workers.services import Services
from workers.state.uptime import UptimeLedger

TYPES = ("g5.xlarge", "p3.2xlarge", "t3.medium", "m5.large", "x9.mystery")  # the last has no price


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


def install_fleet(svc: Services, monkeypatch: pytest.MonkeyPatch, fleet: list[Instance]) -> None:
    """Make the one paginated describe return ``fleet``; uptime is recorded as a sweep would."""
    ledger = UptimeLedger(svc.redis, svc.clock)
    for inst in fleet:
        if inst.state == "running" and inst.launch_time is not None:
            ledger.mark_running(inst.id, inst.launch_time)

    def describe(*args: object, **kwargs: object) -> Iterator[Instance]:
        return iter(fleet)

    monkeypatch.setattr(svc.fleet, "iter_instances", describe)
