"""Logs of private runs (issue 23, finding K): a run's log and [Full log] go to the run's own
channel, or privately to its owner and admins; anyone else asking elsewhere is refused
privately, told where the run lives and who can read it, and nothing is read or posted.
Signed commands and clicks through the real Bolt app, real RQ, the sandbox's executing SSM."""

from __future__ import annotations

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.services import Services
from workers.slack.ids import ActionId

from .conftest import sent_commands
from .slack import click
from .test_instance_names import slash
from .test_lifecycle import as_dict, dispatch
from .test_logs import code_lines, log_file

ALICE_DM = "D0ALICE"  # Alice's direct message with the bot
ALICE, BOB, ADMIN = "U0ALICE", "U0BOB", "U0ADMIN"
QUICK = "-- --epochs 1 --steps-per-epoch 1 --step-seconds 0"


def run_in(svc: Services, slack: FakeSlack, worker: InlineWorker, iid: str, channel: str) -> str:
    """Alice trains from `channel`; the finished run's id."""
    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py {QUICK}", user=ALICE, channel=channel)
    run = svc.runs.latest(iid)
    assert run is not None and run.channel_id == channel and run.state.ended and run.message_ts, run
    return run.run_id


def everything_posted(slack: FakeSlack) -> int:
    return len(slack.calls_to("chat.postMessage")) + len(slack.files)


def with_button(messages: list[Message]) -> Message:
    found = [m for m in messages if any(b.get("type") == "actions" for b in m.blocks)]
    assert found, [m.text for m in messages]
    return found[-1]


def test_the_log_of_a_dm_run_is_its_owners_and_the_admins_alone(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    slack.join(ALICE_DM)
    iid = fleet_seed.instances["cpu-box"]
    run_id = run_in(svc, slack, worker, iid, ALICE_DM)
    log_file(sandbox, iid, run_id).write_text("alice's private line\n")
    sent, posted = len(sent_commands(svc, iid)), everything_posted(slack)

    # Bob, from a channel, by run id and as the newest run: refused privately, nothing read or posted.
    for asked in (f"logs {iid} --run {run_id}", f"logs {iid}"):
        slash(svc, slack, worker, asked, user=BOB)
        refusal = slack.ephemerals(BOB)[-1]
        assert refusal.channel == "C0TRAIN"
        assert (
            f"You can't read the log of run `{run_id}` here: it was started in a direct message by <@U0ALICE>"
            in refusal.text
        )
        assert "privately to its owner and admins" in refusal.text and "Ask <@U0ALICE> or an admin" in refusal.text
    assert "alice's private line" not in "\n".join(m.text + str(m.blocks) for m in slack.ephemerals(BOB))
    assert len(sent_commands(svc, iid)) == sent and everything_posted(slack) == posted

    # Alice, from the same channel: privately to her.
    slash(svc, slack, worker, f"logs {iid} --run {run_id}", user=ALICE)
    mine = slack.ephemerals(ALICE)[-1]
    assert mine.channel == "C0TRAIN" and code_lines([mine]) == ["alice's private line"]
    # An admin too.
    slash(svc, slack, worker, f"logs {iid} --run {run_id}", user=ADMIN)
    assert code_lines([slack.ephemerals(ADMIN)[-1]]) == ["alice's private line"]

    # [Full log] on Alice's answer, clicked by Bob where he is: refused, nothing attached.
    dispatch(svc, slack, worker, click(as_dict(with_button([mine])), ActionId.FULL_LOG, BOB))
    assert slack.files == []
    assert f"You can't read the log of run `{run_id}`" in slack.ephemerals(BOB)[-1].text
    # Clicked by Alice: attached in her run's own thread.
    dispatch(svc, slack, worker, click(as_dict(with_button([mine])), ActionId.FULL_LOG, ALICE))
    (attached,) = slack.files
    assert attached.channel == ALICE_DM and attached.content == b"alice's private line\n"


def test_a_run_in_a_channel_is_read_there_by_anyone_and_elsewhere_by_its_owner(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = run_in(svc, slack, worker, iid, "C0TRAIN")
    log_file(sandbox, iid, run_id).write_text("a line for the channel\n")
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts

    # Bob, elsewhere: refused, told where to ask.
    slash(svc, slack, worker, f"logs {iid} --run {run_id}", user=BOB, channel="C0OPS")
    refusal = slack.ephemerals(BOB)[-1].text
    assert "it was started in <#C0TRAIN> by <@U0ALICE>" in refusal
    assert f"`/runctl logs {iid} --run {run_id}` in <#C0TRAIN>" in refusal

    # Bob, in the run's channel: in the run's thread, and [Full log] from there attaches it.
    slash(svc, slack, worker, f"logs {iid} --run {run_id}", user=BOB)
    answer = slack.thread("C0TRAIN", run.message_ts)[-1]
    assert answer.text.startswith("<@U0BOB>") and code_lines([answer]) == ["a line for the channel"]
    dispatch(svc, slack, worker, click(as_dict(with_button([answer])), ActionId.FULL_LOG, BOB))
    (attached,) = slack.files
    assert attached.channel == "C0TRAIN" and attached.thread_ts == run.message_ts

    # Alice, elsewhere: privately.
    slash(svc, slack, worker, f"logs {iid} --run {run_id}", user=ALICE, channel="C0OPS")
    mine = slack.ephemerals(ALICE)[-1]
    assert mine.channel == "C0OPS" and code_lines([mine]) == ["a line for the channel"]


def test_a_run_runctl_has_no_record_of_is_for_admins(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = run_in(svc, slack, worker, iid, "C0TRAIN")
    svc.redis.delete(*svc.redis.keys("runctl:run*"))  # Redis lost its records

    slash(svc, slack, worker, f"logs {iid}", user=BOB)
    assert "runctl has no record of it" in slack.ephemerals(BOB)[-1].text
    slash(svc, slack, worker, f"logs {iid}", user=ADMIN)
    assert run_id in slack.ephemerals(ADMIN)[-1].text
