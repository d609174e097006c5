"""Instance names (issue 23, findings H and I): a Name tag is untrusted text, shown escaped in
every message; a launch cannot take a name another instance already answers to, after case and
Unicode folding. Signed commands and clicks through the real Bolt app, real RQ, the sandbox."""

from __future__ import annotations

import json
import time

from slack_sdk import WebClient

from bot.app import build_app
from workers.sandbox.aws import SeedInfo
from workers.sandbox.fake_slack import FakeSlack, Message
from workers.sandbox.inline import InlineWorker
from workers.services import Services

from .conftest import TOKEN
from .slack import command
from .test_untrusted_text import assert_inert, everything, texts

HOSTILE_NAME = "<!channel> URGENT `pwn` <https://evil.example|gpu-box-1>"
SHOWN_NAME = "&lt;!channel&gt; URGENT ˋpwnˋ &lt;https://evil.example|gpu-box-1&gt;"


def shown_in(m: Message) -> str:
    return "\n".join(texts([m]))


def slash(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str = "U0ALICE",
          channel: str = "C0TRAIN") -> str:
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

    slash(svc, slack, worker, f"train {iid} train_with_checkpoints.py -- --epochs 1 --steps-per-epoch 1 "
          "--step-seconds 0")
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
