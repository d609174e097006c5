"""A real distributed run in the sandbox: two emulated instances (each its own loopback address as
its private IP), torchrun from the PyTorch CPU wheel with the gloo backend, training/train_ddp.py
through `/runctl train a,b …`. Needs PyTorch: `pip install torch==2.13.0`, then `-m torch`."""

from __future__ import annotations

import re
import socket
import sys
import uuid
from collections.abc import Iterator

import boto3
import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, ResumeCommand, StopCommand, TrainCommand
from workers.jobs.resume import resume
from workers.jobs.stop import stop
from workers.jobs.train import train
from workers.services import Services
from workers.state.locks import train_lock
from workers.state.runs import RunState

from .test_multinode import launch
from .training import wait_until

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
DEADLINE = 180.0
PARAMS = re.compile(r"^params rank (\d+) step (\d+) ([0-9a-f]{16})$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nodes(
    svc: Services, sandbox: Sandbox, fleet_seed: SeedInfo, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """Two g5.xlarge nodes whose `runctl:python` is this interpreter (it has torch); a free
    rendezvous port, as parallel test processes share the host's ports."""
    monkeypatch.setattr(svc.settings, "RUNCTL_RDZV_PORT", free_port())
    ids = launch(sandbox, 2, python=sys.executable)
    yield ids
    boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url).terminate_instances(InstanceIds=ids)


def start(nodes: list[str], *args: str) -> str:
    cmd = TrainCommand(
        instance_id=nodes[0], nodes=tuple(nodes), script="train_ddp.py", args=args, deps=False, nproc_per_node="1"
    )
    run_id = f"r-ddp-{uuid.uuid4().hex[:10]}"
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    return run_id


def log_of(sandbox: Sandbox, iid: str, run_id: str) -> str:
    path = sandbox.instance_dir(iid) / "runs" / run_id / "training.log"
    return path.read_text(errors="replace") if path.exists() else ""


def params(text: str) -> dict[tuple[int, int], str]:
    return {(int(r), int(s)): h for r, s, h in PARAMS.findall(text)}


def checkpoints(sandbox: Sandbox, iid: str, run_id: str) -> list[str]:
    return sorted(p.name for p in (sandbox.instance_dir(iid) / "runs" / run_id / "checkpoints").glob("ckpt-*.pt"))


def thread(slack: FakeSlack, svc: Services, run_id: str) -> list[str]:
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts is not None
    return [m.text for m in slack.thread("C0TRAIN", run.message_ts)]


def test_two_nodes_train_ddp_with_equal_parameters_and_rank_0_checkpoints(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, worker: InlineWorker
) -> None:
    run_id = start(nodes, "--epochs", "3", "--steps-per-epoch", "4")
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    logs = [log_of(sandbox, iid, run_id) for iid in nodes]
    assert run.state is RunState.SUCCEEDED, (run.state, run.error, logs)
    # torchrun on each node, with runctl's environment on every rank
    seen = [params(text) for text in logs]
    assert {r for r, _ in seen[0]} == {0} and {r for r, _ in seen[1]} == {1}
    steps = sorted(s for _, s in seen[0])
    assert steps == list(range(1, 13))
    for s in steps:  # DDP kept the parameters equal on both ranks after each step
        assert seen[0][(0, s)] == seen[1][(1, s)], s
    assert len(set(seen[0].values())) == len(steps)  # and they did change
    # rank 0's checkpoints, on node 0 only
    assert checkpoints(sandbox, nodes[0], run_id) == [f"ckpt-epoch-0000{e}.pt" for e in (1, 2, 3)]
    assert checkpoints(sandbox, nodes[1], run_id) == []
    assert run.checkpoint is not None and run.checkpoint.name == "ckpt-epoch-00003.pt"
    # one parent message and its thread
    parents = [m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts]
    assert len(parents) == 1
    said = thread(slack, svc, run_id)
    assert any("One run on 2 nodes with torchrun" in t for t in said)
    assert any("finished (exit 0)" in t and "ckpt-epoch-00003.pt" in t for t in said)
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)


def test_a_rank_that_raises_ends_the_run_naming_its_node(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, worker: InlineWorker
) -> None:
    run_id = start(nodes, "--epochs", "3", "--steps-per-epoch", "4", "--fail-on-rank", "1", "--fail-at-step", "6")
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.FAILED, (run.state, [log_of(sandbox, i, run_id) for i in nodes])
    failure = next(t for t in thread(slack, svc, run_id) if "failed with exit code" in t)
    assert f"node 1 ({nodes[1]}, rank 1)" in failure, failure
    assert "RuntimeError: simulated failure on rank 1 at step 6" in failure
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)


def test_stop_saves_on_rank_0_ends_both_and_resume_continues(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, worker: InlineWorker
) -> None:
    run_id = start(
        nodes, "--epochs", "40", "--steps-per-epoch", "5", "--step-seconds", "0.05", "--checkpoint-interval", "100"
    )
    wait_until(
        lambda: re.search(r"^epoch 2/40 ", log_of(sandbox, nodes[0], run_id), re.MULTILINE) is not None,
        "epoch 2 on rank 0",
        DEADLINE,
    )
    stop(StopCommand(instance_id=nodes[0]).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.STOPPED, run.state
    saved = checkpoints(sandbox, nodes[0], run_id)
    assert len(saved) == 1, saved  # interval 100: the SIGTERM save, by rank 0
    assert checkpoints(sandbox, nodes[1], run_id) == []
    epoch = int(saved[0][len("ckpt-epoch-") : -len(".pt")])
    for iid in nodes:  # torchrun ended on both nodes
        assert (sandbox.instance_dir(iid) / "runs" / run_id / "exit_code").exists(), iid
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.start_instances(InstanceIds=nodes)
    said = resume(ResumeCommand(run_id=run_id).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    new_id = re.search(r"as run `([^`]+)`", said)
    assert new_id is not None, said
    worker.drain()
    again = svc.runs.get(new_id.group(1))
    assert again is not None and again.nodes == nodes
    assert again.state is RunState.SUCCEEDED, (again.state, again.error, [m.text for m in slack.ephemerals("U0ALICE")])
    text = log_of(sandbox, nodes[0], again.run_id)
    assert "resuming from" in text and f"(epoch {epoch})" in text
    assert f"rank 1: resuming with rank 0 at epoch {epoch}" in log_of(sandbox, nodes[1], again.run_id)
