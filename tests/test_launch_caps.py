"""Every path that makes a launched instance cost money goes through the caps: a start of a
stopped launched instance, a launch's disk size, and a spot replacement (`--auto-resume`).
Signed commands and clicks through the real Bolt app, real RQ (InlineWorker), moto behind the
executing-SSM shim, real Redis and the fake Slack."""

from __future__ import annotations

from typing import Any

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.cost.pricing import load_price_book
from workers.services import Services
from workers.slack.ids import ActionId
from workers.state.runs import RunState

from .slack import click
from .test_launch import confirmation, launched_ids, slash, template  # noqa: F401 (template: a fixture)
from .test_lifecycle import CHANNEL, as_dict, dispatch, run_dir, text_of, wait_for_epoch
from .test_spot_interruption import wait_for


def launch(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str) -> str:
    """`/runctl <text>`, then [Launch]: the new instance's id."""
    before = set(launched_ids(svc))
    slash(svc, slack, worker, text)
    dispatch(svc, slack, worker, click(as_dict(confirmation(slack)), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    (iid,) = set(launched_ids(svc)) - before
    return iid


def test_starting_a_stopped_launched_instance_past_the_cap_is_refused_with_the_numbers(
    svc: Services,
    template: Any,  # noqa: F811
    slack: FakeSlack,
    worker: InlineWorker,
) -> None:
    first = launch(svc, slack, worker, "launch gpu --name first-gpu")
    slash(svc, slack, worker, f"stop {first}")
    assert svc.fleet.get(first).state == "stopped"
    second = launch(svc, slack, worker, "launch gpu --name second-gpu")  # within the cap of one: first is stopped

    slash(svc, slack, worker, f"start {first}")

    assert svc.fleet.get(first).state == "stopped"  # two would run over a cap of one
    refusal = slack.ephemerals("U0ALICE")[-1].text
    assert f"Start of *first-gpu ({first})* refused" in refusal, refusal
    assert "you already run 1 launched instance; the cap is 1 per person" in refusal
    table = f"price from the table of {load_price_book().as_of:%Y-%m-%d}"  # the sandbox's Price List is empty
    assert f"you would burn $2.012/h ($1.006/h now + $1.006/h {table}); the cap is $2.00/h per person" in refusal
    assert "`/runctl stop <instance>`" in refusal and f"`/runctl start {first}` again" in refusal

    # Doing what it says works.
    slash(svc, slack, worker, f"stop {second}")
    slash(svc, slack, worker, f"start {first} --no-wait")
    assert svc.fleet.get(first).state in ("pending", "running")


def test_a_huge_disk_is_refused_and_an_allowed_disk_is_priced_in_the_quote(
    svc: Services,
    template: Any,  # noqa: F811
    slack: FakeSlack,
    worker: InlineWorker,
) -> None:
    slash(svc, slack, worker, "launch gpu --disk 16384")

    refusal = slack.ephemerals("U0ALICE")[-1].text
    assert (
        "Launch refused: a 16384 GB disk (about $1,310.72 a month) is past the cap: up to 500 GB for "
        "everyone, 2000 GB for admins; without `--disk` it gets 200 GB"
    ) in refusal, refusal
    assert "`/runctl launch gpu` (its 200 GB) or `--disk 500` or less" in refusal
    assert not [m for m in slack.messages(CHANNEL) if "asks to *launch" in text_of(m)]

    slash(svc, slack, worker, "launch gpu --disk 300")
    quoted = text_of(confirmation(slack))
    assert "300 GB disk" in quoted
    assert (
        "300 GB gp3 disk: $24.00 a month, running or stopped, until terminated ($0.08/GB-month in us-east-1" in quoted
    )

    # Admins may go past the range, up to the hard maximum, which binds them too.
    slash(svc, slack, worker, "launch gpu --disk 1500", user="U0ADMIN")
    assert "1500 GB gp3 disk: $120.00 a month" in text_of(confirmation(slack))
    slash(svc, slack, worker, "launch gpu --disk 4000", user="U0ADMIN")
    assert "a 4000 GB disk (about $320.00 a month) is past the cap" in slack.ephemerals("U0ADMIN")[-1].text
    assert launched_ids(svc) == []


@pytest.mark.usefixtures("template")
def test_an_auto_resume_replacement_past_the_cap_is_not_launched_and_the_thread_says_what_to_do(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    from workers.commands import TrainCommand
    from workers.jobs.train import train

    from .test_lifecycle import ALICE

    first = launch(svc, slack, worker, "launch gpu --spot")  # Alice's one launched instance: the cap is 1
    args = ("--epochs", "12", "--steps-per-epoch", "4", "--step-seconds", "0.25", "--checkpoint-interval", "100")
    with sandbox.metadata() as imds:
        cmd = TrainCommand(instance_id=first, script="train_with_checkpoints.py", args=args, auto_resume=True)
        train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-capped-1")
        wait_for_epoch(sandbox, first, "r-capped-1", 2)
        imds.raise_notice(first, "stop")
        wait_for(lambda: (run_dir(sandbox, first, "r-capped-1") / "exit_code").exists(), "the training to exit")
        worker.drain(timeout=240)  # the end, the backup, the replacement's caps check

    assert launched_ids(svc) == [first]  # the interrupted instance still runs: a replacement is a second
    old = svc.runs.get("r-capped-1")
    assert old is not None and old.state is RunState.STOPPED
    said = " ".join(m.text for m in slack.thread(CHANNEL, old.message_ts or ""))
    assert "run `r-capped-1` was not resumed on a replacement: Replacement launch refused: " in said, said
    assert "you already run 1 launched instance; the cap is 1 per person" in said
    assert f"Once {first} is stopped or terminated" in said and "`/runctl launch gpu --spot`" in said
    assert "`/runctl resume r-capped-1 --on <instance>`" in said
