"""The end of a run says what happened (issue 26): through the real train flow, monitor and
finish, with the sandbox executing every SSM script under /bin/sh and the fake Slack taking
the chart through files.getUploadURLExternal/completeUploadExternal with its limits."""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message, UploadedFile
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, ChartCommand, StopCommand, TrainCommand
from workers.jobs.stop import stop
from workers.jobs.summary import chart_command, cost_text
from workers.jobs.train import train
from workers.services import Services
from workers.state.runs import Run, RunState

from .conftest import TOKEN
from .slack import action, click

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
G5_XLARGE = Decimal("1.006")  # us-east-1 on-demand, the sandbox's Price List (price_catalogue.json)


def start(svc: Services, iid: str, script: str, *args: str, hours_ago: float = 0) -> str:
    cmd = TrainCommand(instance_id=iid, script=script, args=args)
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    if hours_ago:  # as if it had started earlier: its cost is then dollars, not a fraction of a cent
        run = svc.runs.get(run_id)
        assert run is not None and run.started_at is not None
        run.started_at -= timedelta(hours=hours_ago)
        svc.runs.save(run)
    return run_id


def ended(svc: Services, worker: InlineWorker, run_id: str) -> Run:
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None and run.state.ended and run.message_ts, run
    return run


def final_reply(slack: FakeSlack, run: Run) -> Message:
    assert run.message_ts
    done = [m for m in slack.thread("C0TRAIN", run.message_ts) if "finished (exit" in m.text or "failed with" in m.text]
    assert len(done) == 1, [m.text for m in slack.thread("C0TRAIN", run.message_ts)]
    return done[0]


def charts(slack: FakeSlack, run: Run) -> list[UploadedFile]:
    return [f for f in slack.files if f.thread_ts == run.message_ts and f.filename.endswith(".png")]


def png_series(png: bytes) -> int:
    """The number of series the PNG says it draws (its Description), after checking it is a PNG."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.format == "PNG"
    found = re.match(r"(\d+) series:", Image.open(io.BytesIO(png)).info["Description"])
    assert found, "the chart describes its series"
    return int(found.group(1))


def buttons(message: Message) -> list[dict[str, Any]]:
    return [e for b in message.blocks if b.get("type") == "actions" for e in b["elements"]]


def test_a_script_that_knows_nothing_of_runctl_gets_its_checkpoint_val_loss_chart_and_only_safe_links(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run = ended(svc, worker, start(svc, iid, "plain_train.py", "4"))
    assert run.state is RunState.SUCCEEDED
    text = final_reply(slack, run).text
    assert "./checkpoints/epoch_4.pt" in text and "./outputs/model_final.pt" in text, text
    assert "No checkpoint was written" not in text
    # the final val_loss (1.2 / 4 + 0.01), and the best accuracy
    assert re.search(r"`val_loss` 0\.31\b", text), text
    assert "`val_acc` 92.5" in text, text
    (png,) = charts(slack, run)
    # loss (from the tqdm postfix redrawn with \r), train_loss, val_loss, val_acc
    assert png_series(png.content) == 4
    assert png.alt_txt and png.alt_txt.startswith(f"Line chart of run {run.run_id}"), png.alt_txt  # screen readers
    assert "val_loss, 4 points, from 1.21 to 0.31 (best 0.31)" in png.alt_txt, png.alt_txt
    # W&B on wandb.ai is a button on the parent; the line naming evil.example is nobody's link
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    urls = [b.get("url") for b in buttons(parent) if b.get("url")]
    assert urls == ["https://wandb.ai/alice/mnist/runs/abc123"]
    # Slack opens the page and still sends the click: the real app acks it, queues nothing, says nothing
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    pressed = click({"ts": parent.ts, "blocks": parent.blocks}, "run_link_wandb", "U0BOB")
    before = (worker.pending(), len(slack.ephemerals()))
    assert app.dispatch(action(pressed)).status == 200
    assert (worker.pending(), len(slack.ephemerals())) == before
    assert run.message_ts
    everything = json.dumps(parent.blocks) + json.dumps([m.blocks for m in slack.thread("C0TRAIN", run.message_ts)])
    assert "evil.example" not in everything


def test_runctls_examples_script_reply_names_final_checkpoint_json(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run = ended(svc, worker, start(svc, iid, "examples/test_training_script.py", "--epochs", "4", "--sleep", "0"))
    text = final_reply(slack, run).text
    assert "final_checkpoint.json" in text and "checkpoint_epoch_4.json" in text, text
    assert "No checkpoint was written" not in text
    assert "`loss` 0.4038" in text and "`accuracy` 0.8654" in text, text
    (png,) = charts(slack, run)
    assert png_series(png.content) == 2  # loss on one axes, accuracy on the other


def test_cost_is_the_hourly_price_times_the_runs_time_within_a_cent(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]  # g5.xlarge
    run = ended(svc, worker, start(svc, iid, "no_checkpoints.py", hours_ago=2))
    assert run.started_at and run.ended_at
    expected = G5_XLARGE * Decimal((run.ended_at - run.started_at).total_seconds()) / 3600
    text = final_reply(slack, run).text
    found = re.search(r"Cost \$([0-9,]+\.\d\d): .* of `g5\.xlarge` at \$1\.006/h", text)
    assert found, text
    assert abs(Decimal(found.group(1).replace(",", "")) - expected) <= Decimal("0.01")
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    assert f"Cost ${found.group(1)}" in json.dumps(parent.blocks)


def test_no_checkpoint_was_written_only_when_no_directory_holds_a_file(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    nothing = ended(svc, worker, start(svc, iid, "no_checkpoints.py"))
    assert "No checkpoint was written." in final_reply(slack, nothing).text
    # three points of `loss` (epoch 1..3): a chart, even without checkpoints
    assert len(charts(slack, nothing)) == 1
    saved = ended(svc, worker, start(svc, iid, "examples/test_training_script.py", "--epochs", "2", "--sleep", "0"))
    assert "No checkpoint was written" not in final_reply(slack, saved).text


def test_chart_command_draws_the_runs_curves_in_its_thread(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-2"]
    run = ended(svc, worker, start(svc, iid, "plain_train.py", "3"))
    before = len(charts(slack, run))
    chart_command(ChartCommand(target=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    after = charts(slack, run)
    assert len(after) == before + 1 and png_series(after[-1].content) == 4
    assert after[-1].initial_comment == "<@U0ALICE>"
    said = [m.text for m in slack.thread("C0TRAIN", run.message_ts or "") if "Chart of run" in m.text]
    assert said and "`val_loss`" in said[-1]


def test_an_auto_resume_runs_cost_adds_up_its_instances(svc: Services, fleet_seed: SeedInfo) -> None:
    now = svc.clock()
    first = Run(
        run_id=f"r-test-{uuid.uuid4().hex[:12]}",
        instance_id=fleet_seed.instances["gpu-box-1"],  # g5.xlarge, $1.006/h
        user_id="U0ALICE",
        channel_id="C0TRAIN",
        script="train.py",
        auto_resume=True,
        started_at=now - timedelta(hours=3),
        ended_at=now - timedelta(hours=2),
    )
    second = first.model_copy(
        update={
            "run_id": f"r-test-{uuid.uuid4().hex[:12]}",
            "instance_id": fleet_seed.instances["cpu-box"],  # t3.medium, $0.0416/h
            "checkpoint_run_id": first.run_id,
            "started_at": now - timedelta(hours=2),
            "ended_at": now,
        }
    )
    assert cost_text(svc, first).startswith("Cost $1.01: 1h 00m of `g5.xlarge`")
    said = cost_text(svc, second)
    assert said.startswith("Cost $0.08: 2h 00m of `t3.medium`"), said
    assert "$1.09 over the 2 runs of `--auto-resume`" in said, said


def test_a_stopped_run_says_what_it_cost_and_learned_with_its_chart(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox
) -> None:
    """A stop ends a run too: its thread and parent say the cost, the metrics so far and the
    chart, read before the instance stops (afterwards nothing can ask it)."""
    iid = fleet_seed.instances["gpu-box-1"]  # g5.xlarge
    run_id = start(svc, iid, "examples/test_training_script.py", "--epochs", "1000", "--sleep", "0.1", hours_ago=1)
    log = sandbox.instance_dir(iid) / "runs" / run_id / "training.log"
    slack.wait_for(lambda: log.exists() and "Epoch 4/1000" in log.read_text(), 60)

    stop(StopCommand(instance_id=iid).model_dump(mode="json"), ALICE.model_dump(mode="json"))

    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED and run.message_ts
    [said] = [m.text for m in slack.thread("C0TRAIN", run.message_ts) if "Cost $" in m.text]
    assert re.search(r"Cost \$1\.0\d: 1h 00m of `g5\.xlarge` at \$1\.006/h", said), said
    assert re.search(r"`loss` 0\.\d+", said) and "`accuracy`" in said, said
    (png,) = charts(slack, run)
    assert png_series(png.content) == 2
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    assert "Cost $1.0" in json.dumps(parent.blocks)
    assert svc.fleet.get(iid).state == "stopped"
