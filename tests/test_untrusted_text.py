"""Untrusted text reaches Slack as text (issue 11, findings 4 and 8): script paths, args,
refs, log lines, checkpoint and metric names, the [Keep running] reason, and repository
errors. Read back from the fake Slack: no live broadcast, mention or link, no code span
closed early, and no credential of RUNCTL_REPO."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, CheckpointsCommand, TrainCommand
from workers.jobs.checkpoints import checkpoints
from workers.jobs.sweep import sweep
from workers.jobs.train import train
from workers.services import Services
from workers.settings import Settings
from workers.state.runs import Run, RunState
from workers.state.warnings import Kind, Status, WarningStore

from .conftest import TOKEN
from .slack import action, command

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
# What an attacker types or makes the instance print: every live form Slack knows, and a
# backtick pair that would close the code span it is shown in and open one around "pwn".
HOSTILE = "<!channel> <!here> <!everyone> <https://evil.example|Slack: session expired> <@U0EVIL> `pwn`"
LIVE = re.compile(r"<!(?:channel|here|everyone)|<https?:|<@U0EVIL")

HOSTILE_SCRIPT = f"""\
import json, os, sys
ck = os.environ["RUNCTL_CHECKPOINT_DIR"]
os.makedirs(ck, exist_ok=True)
with open(os.path.join(ck, "ckpt-epoch-00001-<!channel>-`pwn`-<!here>.pt"), "w") as f:
    f.write("x")
with open(os.environ["RUNCTL_PROGRESS_FILE"], "w") as f:
    json.dump({{"epoch": 1, "total_epochs": 3, "metrics": {{"<!everyone>`pwn`": 0.5, "<@U0EVIL>": 1}}}}, f)
for _ in range(3):
    print({HOSTILE!r}, flush=True)
print("```", {HOSTILE!r}, flush=True)
sys.exit(3)
"""
HOSTILE_REF = "feat/<!everyone>|`pwn`"
HOSTILE_PATH = "evil/<!here>`pwn`<!channel>.py"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hostile") / "code"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "hostile.py").write_text(HOSTILE_SCRIPT)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "hostile")
    _git(repo, "branch", HOSTILE_REF)
    return repo


@pytest.fixture
def settings(settings: Settings, hostile_repo: Path) -> Settings:
    return settings.model_copy(update={"RUNCTL_REPO": str(hostile_repo)})


def texts(messages: Iterable[Message]) -> list[str]:
    """What Slack would render: every mrkdwn text of every message, blocks included."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "mrkdwn" and isinstance(node.get("text"), str):
                out.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for m in messages:
        out.append(m.text)
        walk(m.blocks)
    return out


def everything(slack: FakeSlack, *channels: str) -> list[str]:
    """Every version of every message posted, updated or sent privately."""
    seen = [*texts(slack.ephemerals())]
    for ch in channels:
        seen += texts(slack.messages(ch))
    for call in slack.calls_to("chat.update") + slack.calls_to("chat.postMessage"):
        if call.error is None:
            blocks = call.params.get("blocks") or []
            if isinstance(blocks, str):
                blocks = json.loads(blocks)
            seen += texts([Message("", "", str(call.params.get("text", "")), blocks)])
    return seen


def assert_inert(shown: list[str]) -> None:
    for text in shown:
        assert not LIVE.search(text), text
        # the attacker's backticks were replaced, so "pwn" is never a code span of its own
        assert "`pwn`" not in text, text
        assert text.count("```") % 2 == 0, text


def test_hostile_args_ref_log_checkpoint_and_metric_names_are_shown_as_text(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = f"r-hostile-{uuid.uuid4().hex[:8]}"
    cmd = TrainCommand(instance_id=iid, script="hostile.py", ref=HOSTILE_REF, args=("--note", HOSTILE), deps=False)
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.FAILED, run.error
    assert run.progress is not None and "<!everyone>`pwn`" in run.progress.metrics
    assert run.checkpoint is not None and "<!channel>" in run.checkpoint.name
    checkpoints(
        CheckpointsCommand(instance_id=iid, run_id=run_id).model_dump(mode="json"), ALICE.model_dump(mode="json")
    )

    shown = everything(slack, "C0TRAIN")
    joined = "\n".join(shown)
    # everything is there, as text
    assert "failed with exit code 3" in joined and "&lt;!channel&gt;" in joined
    assert "&lt;https://evil.example|Slack: session expired&gt;" in joined  # the log tail
    assert "ckpt-epoch-00001-&lt;!channel&gt;-ˋpwnˋ-&lt;!here&gt;.pt" in joined  # checkpoint name
    assert "&lt;!everyone&gt;ˋpwnˋ 0.5" in joined  # metric name
    assert "feat/&lt;!everyone&gt;|ˋpwnˋ" in joined  # the ref
    assert_inert(shown)


@pytest.mark.parametrize("as_slack_sends_it", [True, False], ids=["html-escaped", "raw"])
def test_hostile_script_path_is_refused_and_echoed_as_text(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, as_slack_sends_it: bool
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    path = (
        HOSTILE_PATH.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if as_slack_sends_it
        else HOSTILE_PATH
    )
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    resp = app.dispatch(command(f"train {iid} {path} -- {HOSTILE}"))
    assert resp.status == 200
    reply = json.loads(resp.body)
    assert reply["response_type"] == "ephemeral" and "Queued" not in reply["text"]
    assert "script path" in reply["text"]
    assert_inert([reply["text"]])


def test_keep_running_reason_is_shown_as_text(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, worker: InlineWorker
) -> None:
    from datetime import timedelta

    from bot.actions.warnings import KEEP_VIEW, REASON_BLOCK, REASON_INPUT

    iid = fleet_seed.instances["gpu-box-1"]
    launched = svc.fleet.get(iid).launch_time
    assert launched is not None
    svc.clock = lambda: launched + timedelta(hours=30)
    svc.runs.create(
        Run(
            run_id="r-owner",
            instance_id=iid,
            user_id="U0ALICE",
            channel_id="C0TRAIN",
            script="train.py",
            state=RunState.SUCCEEDED,
            created_at=launched,
            started_at=launched,
            ended_at=launched + timedelta(hours=1),
        )
    )
    sweep()
    record = WarningStore(svc.redis).get(iid, Kind.COST)
    assert record is not None
    payload = {
        "type": "view_submission",
        "team": {"id": "T0TEAM", "domain": "example"},
        "user": {"id": "U0ALICE", "username": "alice", "team_id": "T0TEAM"},
        "api_app_id": "A0RUNCTL",
        "token": "legacy",
        "trigger_id": f"trig.{time.monotonic_ns()}",
        "view": {
            "id": "V0KEEP",
            "type": "modal",
            "callback_id": KEEP_VIEW,
            "team_id": "T0TEAM",
            "private_metadata": json.dumps({"instance_id": iid, "kind": Kind.COST.value}),
            "state": {"values": {REASON_BLOCK: {REASON_INPUT: {"type": "plain_text_input", "value": HOSTILE}}}},
        },
    }
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    before = worker.pending()
    assert app.dispatch(action(payload)).status == 200
    deadline = time.monotonic() + 5
    while worker.pending() == before and time.monotonic() < deadline:
        time.sleep(0.02)  # Bolt runs the listener after the ack
    worker.drain(timeout=60)
    kept = WarningStore(svc.redis).get(iid, Kind.COST)
    assert kept is not None and kept.status is Status.KEPT and kept.reason == HOSTILE
    shown = texts(m for m in slack.messages("C0OPS") if m.ts == record.ts)
    assert any("Kept running by <@U0ALICE>: “&lt;!channel&gt;" in t for t in shown), shown
    assert_inert(shown)


SECRET_URL = "https://deploy:s3cr3t-pass@127.0.0.1:9/org/training.git?private_token=s3cr3t-query&ref=x"


def test_repository_credentials_never_reach_slack_or_the_log(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    svc.settings = svc.settings.model_copy(update={"RUNCTL_REPO": SECRET_URL})
    iid = fleet_seed.instances["gpu-box-1"]
    run_id = f"r-secret-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.DEBUG):
        train(
            TrainCommand(instance_id=iid, script="hostile.py").model_dump(mode="json"),
            ALICE.model_dump(mode="json"),
            run_id,
        )
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.REFUSED and run.error is not None
    shown = "\n".join(everything(slack, "C0TRAIN"))
    assert "Could not clone RUNCTL_REPO" in shown
    assert "https://***@127.0.0.1:9/org/training.git?private_token=***&amp;ref=x" in shown
    for secret in ("s3cr3t", "deploy:"):
        assert secret not in shown
        assert secret not in caplog.text
        assert secret not in run.error.model_dump_json()
