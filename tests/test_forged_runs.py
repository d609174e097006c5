"""Issue 23 B: the reconcile adopts a run only from a `meta.json` the bot signed, for that
run, on the instance reporting it. Mallory (root on `cpu-box`, as anyone who trains there)
writes run directories; the reconcile runs; nothing of Alice's moves. Driven as
tests/test_reconcile.py drives the reconcile: moto + the executing-SSM shim, real Redis
and RQ (the InlineWorker), the fake Slack; Mallory's resume is a signed /runctl command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from slack_bolt import App

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers import audit
from workers.commands import TrainCommand
from workers.errors import ConfigError
from workers.jobs.reconcile import reconcile
from workers.jobs.train import train
from workers.services import Services
from workers.settings import Settings
from workers.state import records
from workers.state.locks import train_lock
from workers.state.runs import RunMeta, RunState

from .slack import command
from .test_policy import app  # noqa: F401  (the fixture)
from .test_reconcile import ALICE, replies, start, wait_for

MALLORY = "U0MALLORY"
FAKE_TAIL = "epoch 3/3 loss=0.01\n<!channel> everyone: run EVERYONE_SHOULD_CLICK.py <https://evil.example|here>\n"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def forge(sandbox: Sandbox, iid: str, name: str, **meta: object) -> Path:
    """Mallory's run directory: his meta.json, a training process that "vanished" (so the
    monitor reports it at its first poll) and a log tail of his choosing."""
    run_dir = sandbox.instance_dir(iid) / "runs" / name
    run_dir.mkdir(parents=True)
    fields = {"run_id": name, "user": MALLORY, "channel": "C0TRAIN", "script": "EVERYONE_SHOULD_CLICK.py", **meta}
    (run_dir / "meta.json").write_text(json.dumps(fields))
    (run_dir / "pid").write_text(str(dead_pid()))
    (run_dir / "training.log").write_text(FAKE_TAIL)
    return run_dir


def chat_calls(slack: FakeSlack, since: int) -> list[str]:
    return [json.dumps(c.params) for c in slack.calls[since:] if c.method.startswith("chat.")]


def ignored(svc: Services, iid: str) -> list[str]:
    return [r.outcome for r in audit.newest(svc.redis, 20, instance=iid) if r.outcome.startswith("reconcile: ignored")]


def finished_alice_run(svc: Services, fleet_seed: SeedInfo, worker: InlineWorker, run_id: str) -> str:
    """Alice's run on gpu-box-1, finished and reported; its parent message's ts."""
    start(fleet_seed.instances["gpu-box-1"], run_id, epochs=1, step_seconds=0.01)
    worker.drain(timeout=60)
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED and run.message_ts
    return run.message_ts


def test_a_forged_meta_with_alices_channel_and_ts_is_not_adopted(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    parent_ts = finished_alice_run(svc, fleet_seed, worker, "r-alice-done")
    message = next(m for m in slack.messages("C0TRAIN") if m.ts == parent_ts)
    thread = replies(slack, parent_ts)
    mallory_box = fleet_seed.instances["cpu-box"]
    forge(sandbox, mallory_box, "r-mallory-1", user="U0ALICE", ts=parent_ts)
    calls = len(slack.calls)

    reconcile()
    worker.drain(timeout=60)

    assert chat_calls(slack, calls) == []  # no update of Alice's message, nothing in her thread
    assert next(m for m in slack.messages("C0TRAIN") if m.ts == parent_ts) == message
    assert replies(slack, parent_ts) == thread
    assert svc.runs.get("r-mallory-1") is None
    assert any("'r-mallory-1'" in o and "not signed by runctl" in o for o in ignored(svc, mallory_box))


def test_alices_signed_meta_copied_to_another_instance_is_not_adopted_after_redis_is_lost(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    alice_box, mallory_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    parent_ts = finished_alice_run(svc, fleet_seed, worker, "r-alice-copy")
    reconcile()  # marks her end reported on her instance
    assert (sandbox.instance_dir(alice_box) / "runs" / "r-alice-copy" / "reported").exists()
    copy = forge(sandbox, mallory_box, "r-alice-copy")
    shutil.copy(sandbox.instance_dir(alice_box) / "runs" / "r-alice-copy" / "meta.json", copy / "meta.json")
    thread = replies(slack, parent_ts)
    svc.redis.flushdb()
    calls = len(slack.calls)

    reconcile()
    worker.drain(timeout=60)

    assert replies(slack, parent_ts) == thread
    assert chat_calls(slack, calls) == []
    assert svc.runs.get("r-alice-copy") is None
    assert any("started on another instance" in o for o in ignored(svc, mallory_box))


def test_a_forged_checkpoint_run_id_cannot_resume_into_alices_checkpoints(
    app: App,  # noqa: F811
    svc: Services,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    sandbox: Sandbox,
    worker: InlineWorker,
) -> None:
    alice_box, mallory_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    cmd = TrainCommand(
        instance_id=alice_box,
        script="train_with_checkpoints.py",
        backup=True,
        args=("--epochs", "2", "--steps-per-epoch", "1", "--step-seconds", "0"),
    )
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-alice-ck")
    worker.drain(timeout=120)
    alice = svc.runs.get("r-alice-ck")
    assert alice is not None and alice.state is RunState.SUCCEEDED
    forge(sandbox, mallory_box, "r-mallory-2", checkpoint_run_id="r-alice-ck", script="train_with_checkpoints.py")

    reconcile()
    worker.drain(timeout=60)
    app.dispatch(command("resume r-mallory-2", user=MALLORY, response_url=slack.response_url("mallory")))
    worker.drain(timeout=120)

    assert not list((sandbox.instance_dir(mallory_box) / "runs").glob("r-alice-ck/checkpoints/*"))
    assert not [r for r in svc.runs.history(mallory_box) if r.checkpoint_run_id == "r-alice-ck"]
    assert svc.runs.get("r-mallory-2") is None
    told = [m.text for m in slack.responses("mallory")] + [m.text for m in slack.ephemerals(MALLORY)]
    assert any("`r-mallory-2` is not known to runctl" in t for t in told), told


def test_a_directory_named_after_alices_end_marker_does_not_block_her_end(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    alice_box, mallory_box = fleet_seed.instances["gpu-box-1"], fleet_seed.instances["cpu-box"]
    alice_dir = sandbox.instance_dir(alice_box) / "runs" / "r-alice-live"
    start(alice_box, "r-alice-live", epochs=8, step_seconds=0.15)
    wait_for(lambda: "epoch 1/" in (alice_dir / "training.log").read_text(), "epoch 1")
    forge(sandbox, mallory_box, "r-alice-live:end", user="U0ALICE")

    reconcile()
    worker.drain(timeout=90)

    run = svc.runs.get("r-alice-live")
    assert run is not None and run.state is RunState.SUCCEEDED, run and run.state
    done = [t for t in replies(slack, run.message_ts) if "finished (exit 0)" in t]
    assert len(done) == 1 and "<@U0ALICE>" in done[0]
    assert train_lock(svc.redis, alice_box).holder() is None  # Bob may train there now
    assert train_lock(svc.redis, mallory_box).holder() is None
    # The instance's report leaves out a name that is no run id (workers/remote/reconcile.py).
    assert svc.runs.get("r-alice-live:end") is None and not ignored(svc, mallory_box)


def test_a_run_directory_named_with_slack_markup_never_reaches_slack(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, sandbox: Sandbox, worker: InlineWorker
) -> None:
    mallory_box = fleet_seed.instances["cpu-box"]
    forge(sandbox, mallory_box, "r<!here>")
    calls = len(slack.calls)

    reconcile()
    worker.drain(timeout=60)

    assert not any("<!here>" in c for c in chat_calls(slack, calls))
    assert svc.runs.get("r<!here>") is None
    assert not ignored(svc, mallory_box)  # the instance's report leaves it out: no run id


def test_the_record_key_is_its_own_setting_when_set(settings: Settings) -> None:
    meta = RunMeta(run_id="r-k", instance_id="i-0123456789abcdef0", user="U0ALICE", channel="C0TRAIN", script="x.py")
    derived = records.record_key(settings)
    own = records.record_key(settings.model_copy(update={"RUNCTL_RECORD_KEY": SecretStr("k" * 32)}))
    text = records.signed_meta(own, meta)
    assert records.verified_meta(own, text, "r-k", "i-0123456789abcdef0").user == "U0ALICE"
    with pytest.raises(records.Forged):
        records.verified_meta(derived, text, "r-k", "i-0123456789abcdef0")
    with pytest.raises(records.Forged):  # one field changed: Mallory's user on Alice's signature
        records.verified_meta(own, text.replace("U0ALICE", "U0MALLORY"), "r-k", "i-0123456789abcdef0")
    with pytest.raises(ConfigError):
        records.record_key(settings.model_copy(update={"SLACK_BOT_TOKEN": None}))
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(RUNCTL_RECORD_KEY="too-short")


def test_a_multi_node_meta_is_each_nodes_own_and_no_other_instances(settings: Settings) -> None:
    """Every node of a multi-node run keeps node 0's meta: its signed node list makes it each
    node's evidence, and a node added to the list breaks the signature."""
    a, b, c = "i-0000000000000000a", "i-0000000000000000b", "i-0000000000000000c"
    key = records.record_key(settings)
    meta = RunMeta(run_id="r-n", instance_id=a, nodes=[a, b], user="U0ALICE", channel="C0TRAIN", script="x.py")
    text = records.signed_meta(key, meta)
    assert records.verified_meta(key, text, "r-n", b).rebuild().node_ids == [a, b]
    with pytest.raises(records.Forged, match="another instance"):
        records.verified_meta(key, text, "r-n", c)
    with pytest.raises(records.Forged, match="not signed"):
        records.verified_meta(key, text.replace(f'"{b}"]', f'"{b}", "{c}"]'), "r-n", c)
