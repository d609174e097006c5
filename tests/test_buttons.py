"""Who may click each button (issue 23, finding F): every ActionId has a policy action at the
click gate, `/runctl help` says who may click it, and autostop's [Keep running 1h] is the
instance owner's or an admin's, through a signed click, real RQ and the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from bot.grammar import BUTTON_HELP, help_text
from bot.middleware import CLICK_TIERS
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.jobs.sweep import sweep
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.autostop import AutostopStore

from .slack import click
from .test_launch import slash
from .test_lifecycle import CHANNEL, as_dict, dispatch, text_of

ALICE, MALLORY = "U0ALICE", "U0MALLORY"


def test_every_button_has_a_policy_action_at_the_click_gate() -> None:
    assert set(CLICK_TIERS) == set(ActionId)
    missing = [a for a, tier in CLICK_TIERS.items() if not isinstance(tier, str) or not tier]
    assert missing == [], f"buttons the gate lets anyone click: {missing}"


def test_help_says_who_may_click_each_button() -> None:
    assert set(BUTTON_HELP) == set(ActionId)
    text = help_text()
    for action_id, line in BUTTON_HELP.items():
        assert f"`{CLICK_TIERS[action_id]}`" in line, line  # the help names the action the gate checks
        assert line in text


@pytest.fixture(autouse=True)
def _terminate_the_seed(svc: Services, fleet_seed: SeedInfo) -> Iterator[None]:
    yield
    svc.fleet.ec2.terminate_instances(InstanceIds=list(fleet_seed.instances.values()))


def at(svc: Services, moment: datetime) -> None:
    svc.clock = lambda: moment


def test_only_the_owner_or_an_admin_can_keep_an_autostop_running(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    t0 = datetime.now(UTC)
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:user", "Value": ALICE}])  # Alice's
    slash(svc, slack, worker, f"autostop {iid} 30", ALICE)
    at(svc, t0 + timedelta(minutes=25))
    sweep()
    setting = AutostopStore(svc.redis).get(iid)
    assert setting is not None and setting.headsup_ts
    heads_up = next(m for m in slack.messages(CHANNEL) if m.ts == setting.headsup_ts)

    dispatch(svc, slack, worker, click(as_dict(heads_up), ActionId.AUTOSTOP_KEEP, MALLORY))

    told = "\n".join(m.text for m in slack.ephemerals(MALLORY))
    assert "You can't `autostop`" in told and f"the owner (<@{ALICE}>)" in told, told
    kept = AutostopStore(svc.redis).get(iid)
    assert kept is not None and kept.kept_until is None
    assert "keeps" not in text_of(next(m for m in slack.messages(CHANNEL) if m.ts == setting.headsup_ts))
    at(svc, t0 + timedelta(minutes=36))  # the heads-up's ten minutes are over: autostop goes ahead
    sweep()
    worker.drain()
    assert svc.fleet.get(iid).state == "stopped"
