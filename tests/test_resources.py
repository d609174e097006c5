"""`/runctl resources`: rows, totals, filters, Slack limits at 500 instances, the CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from datetime import datetime, timedelta

import pytest

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from workers.aws.instance import Instance
from workers.commands import Actor, ResourcesCommand
from workers.jobs.resources import resources
from workers.services import Services
from workers.state.runs import Run, RunState

from .fleetgen import generate, install_fleet

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
NOW = datetime.fromisoformat("2026-03-10T12:00:00+00:00")


def ask(slack: FakeSlack, **flags: object) -> Message:
    resources(ResourcesCommand(**flags).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    [call] = slack.calls_to("chat.postMessage")[-1:]
    assert call.error is None, call.error  # the fake Slack enforces the block and text limits
    return slack.messages("C0TRAIN")[-1]


def text_of(m: Message) -> str:
    parts = [m.text]
    for block in m.blocks:
        if "text" in block:
            parts.append(block["text"]["text"])
        parts += [e["text"] for e in block.get("elements", []) if isinstance(e.get("text"), str)]
    return "\n".join(parts)


def launched(fleet: list[Instance], line: str) -> datetime:
    """The launch time of the instance a line of the table is about."""
    launch = next(inst for inst in fleet if inst.id in line).launch_time
    assert launch is not None  # generate() gives every instance one
    return launch


def live_run(iid: str, user: str, script: str = "train.py") -> Run:
    return Run(
        run_id=f"r-{iid[-4:]}",
        instance_id=iid,
        user_id=user,
        channel_id="C0TRAIN",
        script=script,
        state=RunState.RUNNING,
        started_at=NOW - timedelta(hours=1),
    )


def test_rows_show_price_uptime_cost_trainer_and_idle_flag(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack
) -> None:
    gpu, cpu = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    launch = svc.fleet.get(gpu).launch_time
    assert launch is not None
    svc.clock = lambda: launch + timedelta(hours=3)
    run = live_run(gpu, "U0RESBOB", "train_with_checkpoints.py")
    svc.runs.create(run)
    svc.runs.save(run)
    svc.fleet.ec2.create_tags(Resources=[cpu], Tags=[{"Key": "runctl:user", "Value": "U0RESBOB"}])

    # moto keeps other tests' instances: Bob's two are the ones to look at.
    shown = text_of(ask(slack, user="U0RESBOB"))

    line = next(ln for ln in shown.splitlines() if gpu in ln)
    assert "*gpu-box-1*" in line and "g5.xlarge" in line and "up 3h 00m" in line
    assert "$1.006/h" in line and "$3.02 so far" in line
    assert "<@U0RESBOB> training `train_with_checkpoints.py`" in line and "idle" not in line
    cpu_line = next(ln for ln in shown.splitlines() if cpu in ln)
    assert re.search(r":zzz: idle (3h 00m|2h 59m)", cpu_line), cpu_line  # seeded a moment after gpu-box-1
    assert "owner <@U0RESBOB>" in cpu_line
    assert sum("`i-" in ln for ln in shown.splitlines()) == 2


def test_stopped_instances_only_with_all(svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    svc.clock = lambda: NOW
    fleet = generate(10, NOW)  # the tenth is stopped
    install_fleet(svc, fleet)
    default = text_of(ask(slack))
    assert fleet[9].id not in default and "1 stopped/terminated or filtered out" in default
    assert fleet[9].id in text_of(ask(slack, all=True))


def test_totals_and_unknown_prices(svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    svc.clock = lambda: NOW
    fleet = [
        Instance(
            id=f"i-{i:017x}",
            type=t,
            state="running",
            region="us-east-1",
            name=f"b{i}",
            launch_time=NOW - timedelta(hours=2),
            tags={"runctl:managed": "true"},
        )
        for i, t in enumerate(["g5.xlarge", "g5.xlarge", "x9.mystery"])
    ]
    install_fleet(svc, fleet)

    shown = text_of(ask(slack))

    assert "burn *$2.01/h*" in shown and "$48.29/day" in shown and "$1,468.76/month" in shown
    assert "1 running instance(s) have an unknown price" in shown
    mystery = next(ln for ln in shown.splitlines() if fleet[2].id in ln)
    assert "price unknown" in mystery and "$0.00" not in mystery


def test_sort_and_user_filter(svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    svc.clock = lambda: NOW
    fleet = generate(10, NOW)
    install_fleet(svc, fleet)
    run = live_run(fleet[3].id, "U0CAROL")
    svc.runs.create(run)
    svc.runs.save(run)

    by_uptime = [ln for ln in text_of(ask(slack, sort="uptime")).splitlines() if "`i-" in ln]
    hours = [launched(fleet, ln) for ln in by_uptime]
    assert hours == sorted(hours)  # oldest launch (longest uptime) first
    mine = text_of(ask(slack, user="U0CAROL"))
    assert fleet[3].id in mine and sum("`i-" in ln for ln in mine.splitlines()) == 1


def test_500_instances_stay_within_slack_limits_and_attach_the_csv(
    svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc.clock = lambda: NOW
    fleet = generate(500, NOW)
    install_fleet(svc, fleet)
    for inst in fleet[:40]:
        run = live_run(inst.id, "U0RESBOB", "a/very/long/path/to/" + "deep/" * 30 + "train.py")
        svc.runs.create(run)
        svc.runs.save(run)

    message = ask(slack, all=True)

    assert len(message.blocks) <= 50
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in message.blocks)
    assert "…and 480 more: the full list is attached as CSV" in text_of(message)
    [upload] = slack.files
    assert upload.filename.endswith(".csv") and upload.thread_ts == message.ts
    rows = list(csv.DictReader(io.StringIO(upload.content.decode())))
    assert len(rows) == 500
    assert {r["instance_id"] for r in rows} == {inst.id for inst in fleet}
    mystery = next(r for r in rows if r["type"] == "x9.mystery")
    assert mystery["usd_per_hour"] == "" and mystery["cost_usd"] == ""


def test_no_csv_when_everything_fits(svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch) -> None:
    svc.clock = lambda: NOW
    install_fleet(svc, generate(12, NOW))
    ask(slack)
    assert slack.files == []


def test_a_plain_name_is_resolved_or_answered_privately(
    svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc.clock = lambda: NOW
    fleet = generate(4, NOW)
    install_fleet(svc, fleet)
    run = live_run(fleet[1].id, "U0CAROL")
    svc.runs.create(run)
    svc.runs.save(run)
    for i in range(450):  # more than one users.list page
        slack.add_user(f"U0FILL{i:04d}", f"filler{i}")
    slack.add_user("U0CAROL", "carol", display_name="Carol K", real_name="Carol King")
    slack.add_user("U0ALEX1", "alex", real_name="Alex One")
    slack.add_user("U0ALEX2", "alex.two", display_name="alex")
    slack.add_user("U0GONE", "ghost", deleted=True)

    for typed in ("@carol", "@Carol K", "@carol king"):
        shown = text_of(ask(slack, user=typed))
        assert fleet[1].id in shown and sum("`i-" in ln for ln in shown.splitlines()) == 1, typed
    assert len(slack.calls_to("users.list")) >= 3 * 3  # every page, each time

    posted = len(slack.messages("C0TRAIN"))
    for typed, said in (
        ("@alex", "2 people are called `@alex`: <@U0ALEX1>, <@U0ALEX2>."),
        ("@nobody", "No one in this Slack workspace is called `@nobody`."),
        ("@ghost", "No one in this Slack workspace is called `@ghost`."),
    ):
        resources(ResourcesCommand(user=typed).model_dump(mode="json"), ALICE.model_dump(mode="json"))
        [answer] = slack.ephemerals("U0ALICE")[-1:]
        assert said in answer.text and "/runctl resources --user @" in answer.text, answer.text
    assert len(slack.messages("C0TRAIN")) == posted  # nothing public


def test_csv_cells_and_owner_tags_written_by_anyone_stay_inert(
    svc: Services, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may tag an instance writes its Name and `runctl:user`: a formula stays text in
    the spreadsheet, and a tag that is not a Slack user id pings nobody and owns nothing."""
    svc.clock = lambda: NOW
    fleet = generate(30, NOW)
    evil = '=HYPERLINK("https://evil.example/x","click")'
    fleet[0] = dataclasses.replace(fleet[0], name=evil, tags={"runctl:managed": "true", "runctl:user": "<!channel>"})
    install_fleet(svc, fleet)

    message = ask(slack, all=True)

    rows = list(csv.DictReader(io.StringIO(slack.files[0].content.decode())))
    mine = next(r for r in rows if r["instance_id"] == fleet[0].id)
    assert mine["name"] == "'" + evil
    assert mine["owner"] == ""
    assert "<!channel>" not in text_of(message)
