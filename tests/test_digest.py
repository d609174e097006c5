"""The daily digest: spend per person and type, running and idle now, warnings,
the chart, once a day, and Slack's limits at 500 instances."""

from __future__ import annotations

import sys
from datetime import datetime, time, timedelta
from decimal import Decimal

import pytest

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from workers.cost.pricing import format_usd
from workers.jobs.digest import digest
from workers.services import Services
from workers.state.runs import Run, RunState
from workers.state.uptime import UptimeLedger

from .fleetgen import generate, install_fleet

OPS = "C0OPS"


def text_of(m: Message) -> str:
    parts = [m.text]
    for block in m.blocks:
        if "text" in block:
            parts.append(block["text"]["text"])
        parts += [e["text"] for e in block.get("elements", []) if isinstance(e.get("text"), str)]
    return "\n".join(parts)


def posted(slack: FakeSlack) -> list[Message]:
    return [m for m in slack.messages(OPS) if "daily digest" in text_of(m)]


@pytest.fixture
def morning(svc: Services, fleet_seed: SeedInfo) -> datetime:
    """09:00 UTC two days after the seeded fleet was launched: all of yesterday it ran."""
    launch = svc.fleet.get(fleet_seed.instances["gpu-box-1"]).launch_time
    assert launch is not None
    now = datetime.combine(launch.date() + timedelta(days=2), time(9), launch.tzinfo)
    svc.clock = lambda: now
    return now


def test_yesterdays_spend_goes_to_who_trained_and_the_rest_to_the_tag_owner(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, morning: datetime
) -> None:
    gpu = fleet_seed.instances["gpu-box-1"]
    slack.add_user("U0ALICE", "alice", "Alice")
    slack.add_user("U0DIGBOB", "bob", "Bob")
    svc.fleet.ec2.create_tags(Resources=[gpu], Tags=[{"Key": "runctl:user", "Value": "U0DIGBOB"}])
    yesterday = morning.replace(hour=0) - timedelta(days=1)
    svc.runs.create(
        Run(
            run_id="r-alice-1",
            instance_id=gpu,
            user_id="U0ALICE",
            channel_id="C0TRAIN",
            script="train.py",
            state=RunState.SUCCEEDED,
            created_at=yesterday + timedelta(hours=6),
            started_at=yesterday + timedelta(hours=6),
            ended_at=yesterday + timedelta(hours=12),
        )
    )

    digest()

    [message] = posted(slack)
    shown = text_of(message)
    # g5.xlarge, $1.006/h, all 24 h of yesterday: 6 h Alice's run, 18 h the tag owner's.
    assert "*Alice* — yesterday $6.04" in shown
    assert "*Bob* — yesterday $18.11" in shown
    assert "<@" not in shown  # by name: the digest pings nobody
    # moto keeps other tests' instances; each running g5.xlarge ran all of yesterday.
    g5 = sum(1 for i in svc.fleet.describe() if i.type == "g5.xlarge" and i.state == "running")
    assert f"`g5.xlarge` — yesterday {format_usd(Decimal('24.144') * g5)}" in shown
    assert "Running now (0)" not in shown
    assert "Idle now (0)" not in shown and "/runctl stop i-" in shown
    [chart] = slack.files
    assert chart.filename.endswith(".png") and chart.content.startswith(b"\x89PNG")
    assert chart.thread_ts == message.ts


def test_the_digest_is_posted_once_a_day(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, morning: datetime
) -> None:
    digest()
    digest()  # the clock restarted, or a second clock process runs
    assert len(posted(slack)) == 1


def test_without_matplotlib_the_digest_posts_without_a_chart(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, morning: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now fails
    digest()
    assert len(posted(slack)) == 1
    assert slack.files == []


def test_open_warnings_are_listed(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, morning: datetime) -> None:
    from workers.jobs.sweep import sweep

    sweep()
    digest()
    shown = text_of(posted(slack)[0])
    assert "Open warnings (0)" not in shown and "idle · " in shown and "· open" in shown


def test_500_instances_stay_within_slack_limits(
    svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.fromisoformat("2026-03-10T09:00:00+00:00")
    svc.clock = lambda: now
    fleet = generate(500, now)
    install_fleet(svc, fleet)
    ledger = UptimeLedger(svc.redis, svc.clock)
    for inst in fleet[:100]:  # ran last week too
        ledger.mark_stopped(inst.id, now - timedelta(days=8))
        ledger.mark_running(inst.id, now - timedelta(days=6))
    for i, inst in enumerate(fleet[:60]):
        svc.runs.create(
            Run(
                run_id=f"r-{i}",
                instance_id=inst.id,
                user_id=f"U0PERSON{i:02d}",
                channel_id="C0TRAIN",
                script="train.py",
                state=RunState.SUCCEEDED,
                created_at=now - timedelta(days=2),
                started_at=now - timedelta(days=2),
                ended_at=now - timedelta(days=1),
            )
        )

    digest()

    [call] = slack.calls_to("chat.postMessage")
    assert call.error is None, call.error
    [message] = posted(slack)
    assert len(message.blocks) <= 50
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in message.blocks)
    assert "…and" in text_of(message)  # long lists are cut, pointing at resources
    assert slack.files and slack.files[0].content.startswith(b"\x89PNG")


def test_two_people_with_one_display_name_stay_two_series_labelled_by_name(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, morning: datetime
) -> None:
    import io

    from PIL import Image

    gpu, cpu = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    slack.add_user("U0SAMONE", "sam.one", "Sam", "Sam Jones")
    slack.add_user("U0SAMTWO", "sam.two", "Sam", "Sam Lee")
    yesterday = morning.replace(hour=0) - timedelta(days=1)
    for run_id, iid, user in (("r-sam-1", gpu, "U0SAMONE"), ("r-sam-2", cpu, "U0SAMTWO")):
        svc.runs.create(
            Run(
                run_id=run_id,
                instance_id=iid,
                user_id=user,
                channel_id="C0TRAIN",
                script="train.py",
                state=RunState.SUCCEEDED,
                created_at=yesterday + timedelta(hours=1),
                started_at=yesterday + timedelta(hours=1),
                ended_at=yesterday + timedelta(hours=9),
            )
        )

    digest()

    shown = text_of(posted(slack)[0])
    assert "*Sam (Sam Jones)* — yesterday" in shown and "*Sam (Sam Lee)* — yesterday" in shown
    [chart] = slack.files
    described = Image.open(io.BytesIO(chart.content)).text["Description"]  # type: ignore[attr-defined]
    assert "Sam (Sam Jones): $" in described and "Sam (Sam Lee): $" in described
    assert "U0SAM" not in described
    assert slack.calls_to("users.info")  # names come from Slack (users:read)
