"""Instance names (issue 23, findings H and I): a Name tag is untrusted text, shown escaped in
every message; a launch cannot take a name another instance already answers to, after case and
Unicode folding. Signed commands and clicks through the real Bolt app, real RQ, the sandbox."""

from __future__ import annotations

import json
import time

import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.services import Services
from workers.slack.ids import ActionId

from .conftest import TOKEN
from .slack import click, command
from .test_launch import launched_ids, template  # noqa: F401 (template: a fixture)
from .test_lifecycle import as_dict, dispatch
from .test_untrusted_text import assert_inert, everything, texts

HOSTILE_NAME = "<!channel> URGENT `pwn` <https://evil.example|gpu-box-1>"
MALLORY = "U0MALLORY"
SHOWN_NAME = "&lt;!channel&gt; URGENT ˋpwnˋ &lt;https://evil.example|gpu-box-1&gt;"


def shown_in(m: Message) -> str:
    return "\n".join(texts([m]))


def slash(
    svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str = "U0ALICE", channel: str = "C0TRAIN"
) -> str:
    """A signed slash command, then every job it queued; returns the immediate reply's text."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(text, user=user, channel=channel))
    assert resp.status == 200
    deadline = time.monotonic() + 3
    while not worker.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.drain(timeout=120)
    return str(json.loads(resp.body).get("text", "")) if resp.body else ""


def test_a_hostile_name_tag_is_shown_as_text_in_status_run_resources_and_terminate(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "Name", "Value": HOSTILE_NAME}])

    slash(svc, slack, worker, f"status {iid}")
    status = "\n".join(everything(slack))
    assert SHOWN_NAME in status and "Train lock: free" in status

    slash(
        svc, slack, worker, f"train {iid} train_with_checkpoints.py -- --epochs 1 --steps-per-epoch 1 --step-seconds 0"
    )
    run = svc.runs.latest(iid)
    assert run is not None and run.message_ts
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    assert SHOWN_NAME in shown_in(parent)

    slash(svc, slack, worker, "resources")
    listing = shown_in(slack.ephemerals("U0ALICE")[-1])
    assert "g5.xlarge" in listing and SHOWN_NAME in listing, listing
    slash(svc, slack, worker, f"terminate {iid}", user="U0ADMIN")
    asked = [shown_in(m) for m in slack.messages("C0TRAIN") if "asks to *terminate" in shown_in(m)]
    assert asked and SHOWN_NAME in asked[-1]

    shown = everything(slack, "C0TRAIN", "C0OPS")
    assert sum(SHOWN_NAME in t for t in shown) >= 4, shown
    assert_inert(shown)
    assert svc.fleet.get(iid).state == "running"  # asked, not terminated


# --- I: a launched name cannot capture another's ----------------------------------------


def launch_asks(slack: FakeSlack) -> list[Message]:
    return [m for m in slack.messages("C0TRAIN") if "asks to *launch" in shown_in(m)]


@pytest.mark.usefixtures("template")  # the launch file (tests/test_launch.py)
def test_a_launch_name_equal_to_another_after_folding_is_refused_and_the_owner_keeps_hers(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    alices, bobs = fleet_seed.instances["gpu-box-2"], fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[alices], Tags=[{"Key": "Name", "Value": "Alice-GPU"}])
    # fullwidth letters and hyphen: NFKC makes them "bob-gpu"
    svc.fleet.ec2.create_tags(Resources=[bobs], Tags=[{"Key": "Name", "Value": "ｂｏｂ－ｇｐｕ"}])

    for typed, holder in (("alice-gpu", "`Alice-GPU`"), ("BOB-gpu", "`ｂｏｂ－ｇｐｕ`")):
        slash(svc, slack, worker, f"launch gpu --name {typed}", user=MALLORY)
        told = slack.ephemerals(MALLORY)[-1].text
        assert f"The name `{typed}` is taken: {holder}" in told, told
        assert f"`/runctl launch gpu --name {typed}-2`" in told  # what to type instead
    assert launch_asks(slack) == [] and launched_ids(svc) == []

    # Alice types her name in lower case: she gets her own instance, and is told how it matched.
    slash(svc, slack, worker, "status alice-gpu")
    told = "\n".join(m.text for m in slack.ephemerals("U0ALICE"))
    assert f"Alice-GPU ({alices})" in told
    assert "`alice-gpu` matched `Alice-GPU` (names compare without case)." in told
    slash(svc, slack, worker, "status Alice-GPU", user="U0BOB")  # typed as it is: no note
    assert "matched" not in "\n".join(m.text for m in slack.ephemerals("U0BOB"))


@pytest.mark.usefixtures("template")  # the launch file (tests/test_launch.py)
def test_a_name_taken_between_the_ask_and_the_click_is_refused_at_the_click(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    slash(svc, slack, worker, "launch gpu --name Alice-GPU")
    slash(svc, slack, worker, "launch gpu --name alice-gpu", user=MALLORY)  # nobody has it yet
    alice_ask, mallory_ask = launch_asks(slack)
    dispatch(svc, slack, worker, click(as_dict(alice_ask), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    (alices,) = launched_ids(svc)

    dispatch(svc, slack, worker, click(as_dict(mallory_ask), ActionId.LAUNCH_CONFIRM, MALLORY))

    assert launched_ids(svc) == [alices]
    after = shown_in(next(m for m in slack.messages("C0TRAIN") if m.ts == mallory_ask.ts))
    assert "did not happen: The name `alice-gpu` is taken: `Alice-GPU`" in after
    slash(svc, slack, worker, "status alice-gpu")
    assert f"Alice-GPU ({alices})" in slack.ephemerals("U0ALICE")[-1].text


def test_a_name_several_instances_answer_to_picks_none(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Names given before this rule (or outside runctl) may still clash: an exact match is not
    preferred over a folded one, since either could be the one meant."""
    alices, mallorys = fleet_seed.instances["gpu-box-2"], fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[alices], Tags=[{"Key": "Name", "Value": "Alice-GPU"}])
    svc.fleet.ec2.create_tags(Resources=[mallorys], Tags=[{"Key": "Name", "Value": "alice-gpu"}])

    slash(svc, slack, worker, "stop alice-gpu")

    told = slack.ephemerals("U0ALICE")[-1].text
    assert "2 instances runctl manages are named `alice-gpu`" in told and "instance id" in told
    assert f"Alice-GPU ({alices})" in told and f"alice-gpu ({mallorys})" in told
    assert svc.fleet.get(alices).state == "running" and svc.fleet.get(mallorys).state == "running"
