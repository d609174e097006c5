"""`/runctl train a,b script`: one run across several instances on torchrun — the grammar, the
pre-flight refusals and the all-or-none locks. None of these needs PyTorch: the race test's nodes
run a stand-in `torch.distributed.run` (tests/torchstub, one worker, no rendezvous), the real
distributed run is in tests/test_multinode_torch.py (`-m torch`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from slack_sdk import WebClient

from bot.app import build_app
from bot.grammar import parse
from runctl_sandbox import ssm_agent
from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from tests.conftest import TOKEN
from tests.slack import command, dispatched
from workers import audit
from workers.aws.instance import PYTHON_TAG
from workers.commands import Actor, LogsCommand, StopCommand, TrainCommand
from workers.cost.pricing import cost_of, format_usd, hourly_price, load_price_book
from workers.errors import UsageError
from workers.jobs import queued
from workers.jobs.logs import logs
from workers.jobs.reconcile import run_pass
from workers.jobs.status import describe
from workers.jobs.stop import stop
from workers.jobs.train import train
from workers.remote import gpu
from workers.services import Services
from workers.slack.ids import BlockId
from workers.state.locks import acquire_all, release_all, train_lock
from workers.state.run_queue import QueueStore
from workers.state.runs import Run, RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
BOB = Actor(user_id="U0BOB", channel_id="C0TRAIN")
STUB = Path(__file__).parent / "torchstub"


def launch(sandbox: Sandbox, count: int, instance_type: str = "g5.xlarge", python: str = "", **tags: str) -> list[str]:
    """`count` managed running instances, named uniquely, with `runctl:python` set when given."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ids = []
    for _ in range(count):
        name = f"node-{uuid.uuid4().hex[:8]}"
        all_tags = {"Name": name, MANAGED_TAG: "true", **tags}
        if python:
            all_tags[PYTHON_TAG] = python
        reply = ec2.run_instances(
            ImageId=AMI_ID,
            InstanceType=instance_type,  # type: ignore[arg-type]
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()]}
            ],
        )
        ids.append(reply["Instances"][0]["InstanceId"])
    LAUNCHED.extend(ids)
    return ids


LAUNCHED: list[str] = []  # every instance a test launched: terminated after it, so no later test sees it


@pytest.fixture(autouse=True)
def _terminate_launched(sandbox: Sandbox) -> Iterator[None]:
    yield
    if LAUNCHED:
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
        ec2.terminate_instances(InstanceIds=list(LAUNCHED))
        LAUNCHED.clear()


@pytest.fixture
def nodes(sandbox: Sandbox, fleet_seed: SeedInfo) -> Iterator[list[str]]:
    """Two managed running g5.xlarge instances (fleet_seed: the bundle bucket)."""
    ids = launch(sandbox, 2)
    yield ids
    boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url).terminate_instances(InstanceIds=ids)


@pytest.fixture
def stub_python(tmp_path: Path) -> str:
    """An interpreter whose `torch.distributed.run` is tests/torchstub's stand-in (no PyTorch needed)."""
    path = tmp_path / "python-torchstub"
    path.write_text(f'#!/bin/sh\nPYTHONPATH={STUB}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


def start(nodes: list[str], *args: str, who: Actor = ALICE, port: int | None = None, **kw: Any) -> str:
    cmd = TrainCommand(instance_id=nodes[0], nodes=tuple(nodes), script="train_with_checkpoints.py", args=args, **kw)
    run_id = f"r-test-{uuid.uuid4().hex[:12]}"
    train(cmd.model_dump(mode="json"), who.model_dump(mode="json"), run_id)
    return run_id


def refusal(slack: FakeSlack, user: str) -> str:
    said = [m.text for m in slack.ephemerals(user)]
    assert said, "nothing was told to the requester"
    return said[-1]


# --- grammar ---------------------------------------------------------------------------


def test_the_grammar_reads_a_node_list_and_nproc_per_node() -> None:
    cmd = parse("train gpu-a,gpu-b,i-0123456789abcdef0 train.py --nproc-per-node auto -- --epochs 3")
    assert isinstance(cmd, TrainCommand)
    assert cmd.nodes == ("gpu-a", "gpu-b", "i-0123456789abcdef0") and cmd.instance_id == "gpu-a"
    assert cmd.nproc_per_node == "auto" and cmd.args == ("--epochs", "3")
    single = parse("train gpu-a train.py")
    assert isinstance(single, TrainCommand) and single.nodes == ()
    for text, said in (
        ("train a,a x.py", "each instance may appear once"),
        ("train a x.py --nproc-per-node 2", "several instances"),
        ("train a,b x.py --nproc-per-node 0", "`--nproc-per-node`"),
        ("train a,b x.py --force", "--force is not available for a multi-node run"),
        ("train a,,b x.py", "is not an instance id"),
    ):
        with pytest.raises(UsageError) as err:
            parse(text)
        assert said in err.value.what, (text, err.value.what)


# --- pre-flight refusals ------------------------------------------------------------------


def test_a_stopped_node_refuses_the_whole_run_privately(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack
) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.stop_instances(InstanceIds=[nodes[1]])
    run = svc.runs.get(start(nodes, "--epochs", "1"))
    assert run is not None and run.state is RunState.REFUSED
    told = refusal(slack, "U0ALICE")
    assert "pre-flight of this 2-node run failed" in told
    assert f"node 1 ({nodes[1]})" in told and "stopped" in told and f"/runctl start {nodes[1]}" in told
    assert slack.messages("C0TRAIN") == []  # private: no parent message
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)
    assert sandbox.sent_scripts(nodes[0]) == []  # nothing reached the running node


def test_nodes_of_different_types_are_refused_with_why(svc: Services, sandbox: Sandbox, slack: FakeSlack) -> None:
    ids = launch(sandbox, 1, "g5.xlarge") + launch(sandbox, 1, "p3.2xlarge")
    run = svc.runs.get(start(ids, "--epochs", "1"))
    assert run is not None and run.state is RunState.REFUSED
    told = refusal(slack, "U0ALICE")
    assert "different types" in told and "`g5.xlarge`" in told and "`p3.2xlarge`" in told
    assert "slowest node" in told


def test_a_blocked_rendezvous_port_is_found_by_a_real_tcp_check(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, stub_python: str
) -> None:
    """Node 1 connects to node 0's private IP (its own loopback address in the sandbox) on the
    rendezvous port; the sandbox drops those packets as a security group without the rule does."""
    port = svc.settings.RUNCTL_RDZV_PORT
    assert sandbox.private_ip(nodes[0]) != sandbox.private_ip(nodes[1])
    assert svc.fleet.get(nodes[0]).private_ip == sandbox.private_ip(nodes[0])
    sandbox.block_port(nodes[0], port)
    try:
        run = svc.runs.get(start(nodes, "--epochs", "1"))
    finally:
        sandbox.block_port(nodes[0], port, blocked=False)
    assert run is not None and run.state is RunState.REFUSED
    told = refusal(slack, "U0ALICE")
    assert "node 1, " in told and nodes[1] in told
    assert f"cannot reach node 0's private IP `{sandbox.private_ip(nodes[0])}` on TCP port {port}" in told
    assert "timed out" in told and "authorize-security-group-ingress" in told and f"--port {port}" in told
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)
    assert not any("torch.distributed.run --nnodes" in s for iid in nodes for s in sandbox.sent_scripts(iid))


def test_an_open_port_passes_the_reach_check(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, stub_python: str, worker: InlineWorker
) -> None:
    """The same check unblocked: node 1's connect is refused by node 0's host (allowed, nothing
    listens yet), so the run starts — here on the stand-in torchrun."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "2", "--steps-per-epoch", "2", "--step-seconds", "0.01", deps=False)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, (run.state, run.error, run.log_tail)
    sent = [s for s in sandbox.sent_scripts(nodes[1]) if "torch.distributed.run" in s and "--node-rank" in s]
    assert len(sent) == 1
    assert f"--rdzv-endpoint {sandbox.private_ip(nodes[0])}:{svc.settings.RUNCTL_RDZV_PORT}" in sent[0]
    assert "--node-rank 1" in sent[0] and "--nnodes 2" in sent[0] and f"--rdzv-id {run_id}" in sent[0]
    assert all(train_lock(svc.redis, iid).holder() is None for iid in nodes)
    # one parent message; its thread says where the run is and what the node set costs per hour
    assert run.message_ts is not None
    said = [m.text for m in slack.thread("C0TRAIN", run.message_ts)]
    assert any("One run on 2 nodes with torchrun" in t and "for all 2 nodes" in t for t in said), said
    assert len([m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts]) == 1
    # rank 0 alone wrote checkpoints (runctl_protocol: RANK != 0 writes nothing)
    ck = [sandbox.instance_dir(iid) / "runs" / run_id / "checkpoints" for iid in nodes]
    assert sorted(p.name for p in ck[0].glob("ckpt-*")) == ["ckpt-epoch-00001.json", "ckpt-epoch-00002.json"]
    assert list(ck[1].glob("ckpt-*")) == [] and not (ck[1] / "manifest.json").exists()
    # `logs --node 1`: node 1's torchrun log, in the run's thread
    logs(
        LogsCommand(instance_id=nodes[0], run_id=run_id, node=1).model_dump(mode="json"),
        ALICE.model_dump(mode="json"),
    )
    said = [m.text + str(m.blocks) for m in slack.thread("C0TRAIN", run.message_ts)]
    assert any("torchstub: node rank 1 of 2" in t for t in said)
    assert not any("torchstub: node rank 0 of 2" in t for t in said)


# --- locks ---------------------------------------------------------------------------------


def test_all_or_none_locks(svc: Services) -> None:
    ids = ["i-00000000000000001", "i-00000000000000002", "i-00000000000000003"]
    assert train_lock(svc.redis, ids[1]).acquire("single")
    assert acquire_all(svc.redis, ids, "multi") == ids[1]
    assert train_lock(svc.redis, ids[0]).raw() is None and train_lock(svc.redis, ids[2]).raw() is None
    train_lock(svc.redis, ids[1]).release("single")
    assert acquire_all(svc.redis, ids, "multi") is None
    assert [train_lock(svc.redis, i).raw() for i in ids] == ["multi"] * 3
    assert release_all(svc.redis, ids, "other") == 0
    assert release_all(svc.redis, ids, "multi") == 3


def test_a_race_with_a_single_node_train_leaves_exactly_one_running(
    svc: Services, sandbox: Sandbox, nodes: list[str], slack: FakeSlack, stub_python: str, worker: InlineWorker
) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    args = ("--epochs", "50", "--steps-per-epoch", "5", "--step-seconds", "0.05")
    ids: dict[str, str] = {}
    go = threading.Barrier(2)

    def multi() -> None:
        go.wait()
        ids["multi"] = start(nodes, *args, deps=False)

    def single() -> None:
        go.wait()
        cmd = TrainCommand(instance_id=nodes[1], script="train_with_checkpoints.py", args=args, deps=False)
        ids["single"] = f"r-test-{uuid.uuid4().hex[:12]}"
        train(cmd.model_dump(mode="json"), BOB.model_dump(mode="json"), ids["single"])

    threads = [threading.Thread(target=multi), threading.Thread(target=single)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    runs = {k: svc.runs.get(v) for k, v in ids.items()}
    states = {k: r.state for k, r in runs.items() if r is not None}
    running = [k for k, s in states.items() if s is RunState.RUNNING]
    assert len(running) == 1, states
    loser = "single" if running == ["multi"] else "multi"
    assert states[loser] is RunState.REFUSED
    holder = train_lock(svc.redis, nodes[1]).holder()
    assert holder is not None and holder.run_id == ids[running[0]]
    if running == ["single"]:  # the multi-node run took no node at all
        assert train_lock(svc.redis, nodes[0]).holder() is None


def test_the_reconcile_keeps_every_node_locked_while_the_run_lives(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str
) -> None:
    """Node 1 reports the run as its own: the reconcile must not release node 1's lock as stale."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "50", "--steps-per-epoch", "5", "--step-seconds", "0.05", deps=False)
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING, (run and run.state, run and run.error)
    run_pass(svc)
    for iid in nodes:
        holder = train_lock(svc.redis, iid).holder()
        assert holder is not None and holder.run_id == run_id, iid


def test_a_redis_loss_mid_run_brings_back_every_node_and_then_stop_stops_them_all(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str, slack: FakeSlack, worker: InlineWorker
) -> None:
    """Redis emptied while a 2-node run trains: the reconcile re-adopts it from its signed meta
    as one run on both nodes (whichever node answers first), both locks retaken, so its end
    reports once and `--then stop` stops both (not node 0 alone, leaving node 1 to bill)."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "6", "--steps-per-epoch", "4", "--step-seconds", "0.5", deps=False, then="stop")
    before = svc.runs.get(run_id)
    assert before is not None and before.state is RunState.RUNNING, (before and before.state, before and before.error)

    svc.redis.flushdb()  # a failover to an empty replica
    run_pass(svc)

    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.RUNNING and run.node_ids == nodes
    assert [h.run_id if (h := train_lock(svc.redis, iid).holder()) else None for iid in nodes] == [run_id] * 2
    ignored = [r.outcome for iid in nodes for r in audit.newest(svc.redis, 20, instance=iid) if "ignored" in r.outcome]
    assert ignored == []  # no node's meta taken for a forgery
    assert describe(nodes[1]).count(f"Live run `{run_id}`") == 1
    worker.drain(timeout=120)
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED and run.message_ts
    said = [m.text for m in slack.thread("C0TRAIN", run.message_ts)]
    assert sum("picked it up again" in t for t in said) == 1, said
    assert [svc.fleet.get(iid).state for iid in nodes] == ["stopped", "stopped"], said


def test_status_of_any_node_shows_the_run_and_its_nodes(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str, slack: FakeSlack
) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "50", "--steps-per-epoch", "5", "--step-seconds", "0.05", deps=False)
    text = describe(nodes[1])
    assert f"Live run `{run_id}`" in text
    assert f"On 2 nodes with torchrun (node 0 `{nodes[0]}`, node 1 `{nodes[1]}`); this is node 1." in text


def test_then_stop_stops_every_node_when_the_run_ends(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str, slack: FakeSlack, worker: InlineWorker
) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "1", "--steps-per-epoch", "2", "--step-seconds", "0.01", deps=False, then="stop")
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.SUCCEEDED, (run and run.state, run and run.error)
    assert run.message_ts is not None
    said = [m.text for m in slack.thread("C0TRAIN", run.message_ts)]
    assert [svc.fleet.get(iid).state for iid in nodes] == ["stopped", "stopped"], said
    assert sum("(`--then stop`)" in t for t in said) == 2, said


# --- the end of a run: cost summed over the nodes; each node's liveness -----------------------


def _signed(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str, user: str = "U0ALICE") -> None:
    """`text` as a signed /runctl command to the Bolt app, then every job it queued, run."""
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    dispatched(app, worker, command(text, user=user), 180)


def test_the_end_of_run_cost_is_the_sum_over_the_nodes(
    svc: Services, sandbox: Sandbox, fleet_seed: SeedInfo, slack: FakeSlack, stub_python: str, worker: InlineWorker
) -> None:
    """Issue 29: "cost = the sum over nodes": each node's price for the run's time, added up."""
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    ids = launch(sandbox, 2, "g5.24xlarge", python=stub_python)
    args = "--epochs 3 --steps-per-epoch 10 --step-seconds 0.2"
    _signed(svc, slack, worker, f"train {ids[0]},{ids[1]} train_with_checkpoints.py --no-deps -- {args}")
    run = svc.runs.latest(ids[0])
    assert run is not None and run.state is RunState.SUCCEEDED, [m.text for m in slack.messages("C0TRAIN")]
    assert run.started_at is not None and run.ended_at is not None and run.message_ts is not None
    inst = svc.fleet.get(ids[0])
    price = hourly_price(load_price_book(), svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, None)
    seconds = (run.ended_at - run.started_at).total_seconds()
    one = cost_of(price.usd_per_hour, seconds)
    assert one is not None and format_usd(one) != format_usd(2 * one)  # the test tells one node from two
    final = [m.text for m in slack.thread("C0TRAIN", run.message_ts) if "finished (exit 0)" in m.text]
    assert final, [m.text for m in slack.thread("C0TRAIN", run.message_ts)]
    assert f"Cost {format_usd(2 * one)}: " in final[-1], final[-1]
    assert "of 2 nodes, each `g5.24xlarge` at " in final[-1] and "summed over the nodes" in final[-1]
    assert f"Cost {format_usd(2 * one)}: " in (run.outcome.cost if run.outcome else "")


def test_the_parent_shows_each_nodes_liveness_and_gpus(
    svc: Services,
    sandbox: Sandbox,
    fleet_seed: SeedInfo,
    slack: FakeSlack,
    stub_python: str,
    worker: InlineWorker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 29: "one parent message and one thread for the run: progress from rank 0, each
    node's liveness, GPU use per node". Each node's nvidia-smi prints its own rows (the fake
    picks them by AWS_SSM_INSTANCE_ID, which the SSM agent sets for every command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" != "--query-gpu={gpu.QUERY}" ] || [ "$2" != "--format=csv,noheader,nounits" ]; then exit 2; fi\n'
        f'cat "{tmp_path}/gpus-$AWS_SSM_INSTANCE_ID.csv"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(ssm_agent, "AGENT_PATH", f"{bin_dir}:{ssm_agent.AGENT_PATH}")
    svc.settings.RUNCTL_POLL_MIN_SECONDS, svc.settings.RUNCTL_POLL_MAX_SECONDS = 1, 2
    ids = launch(sandbox, 2, python=stub_python)
    (tmp_path / f"gpus-{ids[0]}.csv").write_text("0, 87, 10035, 24564\n")
    (tmp_path / f"gpus-{ids[1]}.csv").write_text("0, 12, 2048, 24564\n")
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    args = "--epochs 200 --steps-per-epoch 5 --step-seconds 0.1"
    worker.start(0.05)
    try:
        app.dispatch(command(f"train {ids[0]},{ids[1]} train_with_checkpoints.py --no-deps -- {args}"))

        def started() -> Run | None:
            found = svc.runs.latest(ids[0])
            return found if found is not None and found.message_ts else None

        run = slack.wait_for(started, 60)
        assert run is not None

        def parent() -> str:
            found = [m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts]
            blocks = [b for b in found[0].blocks if b.get("block_id") == BlockId.RUN_PROGRESS] if found else []
            return str(blocks[0]["text"]["text"]) if blocks else ""

        zero = f"node 0 `{ids[0]}`: alive · GPU 0: 87% · 9.8/24.0 GiB"
        one = f"node 1 `{ids[1]}`: alive · GPU 0: 12% · 2.0/24.0 GiB"
        slack.wait_for(lambda: zero in parent() and one in parent(), 60)
        assert "|" not in parent()  # no flat line of every node's GPUs numbered alike

        pid = int((sandbox.instance_dir(ids[1]) / "runs" / run.run_id / "pid").read_text())
        os.kill(pid, signal.SIGKILL)  # node 1's torchrun dies; the stand-in leaves node 0 running
        slack.wait_for(lambda: f"node 1 `{ids[1]}`: exited (exit 137)" in parent() and zero in parent(), 60)
        assert "GPU 0: 12%" not in parent()

        app.dispatch(command(f"stop {ids[0]}"))
        slack.wait_for(lambda: all(svc.fleet.get(i).state == "stopped" for i in ids), 120)
    finally:
        worker.stop()
    assert "node 0 " not in parent()  # an ended run's message keeps no liveness


def test_a_queued_node_set_waits_for_every_node_and_keeps_each_nodes_order(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str, slack: FakeSlack, worker: InlineWorker
) -> None:
    """`train a,b … --queue` is one request on both nodes: with b busy it does not start on a
    (nor as a one-node run), a run queued on a after it waits its turn, and when b's run ends the
    node set starts on both, then a's next."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    bob = TrainCommand(instance_id=nodes[1], script="train_with_checkpoints.py", deps=False, args=("--epochs", "4"))
    bob_id = f"r-test-{uuid.uuid4().hex[:12]}"
    train(bob.model_dump(mode="json"), BOB.model_dump(mode="json"), bob_id)
    app = build_app(svc.settings, svc.redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    quick = "-- --epochs 1 --steps-per-epoch 2 --step-seconds 0.01"
    for text, user in (
        (f"train {nodes[0]},{nodes[1]} train_with_checkpoints.py --queue --no-deps {quick}", "U0ALICE"),
        (f"train {nodes[0]} train_with_checkpoints.py --queue --no-deps {quick}", "U0CAROL"),
    ):
        app.dispatch(command(text, user=user))
        slack.wait_for(worker.pending, 5)
        worker.work()  # its queue job alone, in the order sent (Bob's monitor ticks wait their time)
    on_a = QueueStore(svc.redis).entries(nodes[0])
    assert [e.user_id for e in on_a] == ["U0ALICE", "U0CAROL"]
    assert [e.user_id for e in QueueStore(svc.redis).entries(nodes[1])] == ["U0ALICE"]
    assert svc.runs.live_on(nodes[0]) is None  # not started on a alone

    worker.drain(timeout=180)
    alice_id, carol_id = (e.entry_id for e in on_a)
    runs = [svc.runs.get(i) for i in (bob_id, alice_id, carol_id)]
    assert all(r is not None and r.state is RunState.SUCCEEDED for r in runs), [r and (r.state, r.error) for r in runs]
    bob_run, alice_run, carol_run = (r for r in runs if r is not None)
    assert alice_run.node_ids == nodes  # a multi-node run on both, not one node
    assert bob_run.ended_at and alice_run.started_at and alice_run.started_at >= bob_run.ended_at
    assert alice_run.ended_at and carol_run.started_at and carol_run.started_at >= alice_run.ended_at
    assert [
        len([m for m in slack.messages("C0TRAIN") if m.thread_ts is None and f"({i})" in m.text])
        for i in (alice_id, carol_id)
    ] == [1, 1]


def test_stopping_a_node_set_holds_every_nodes_queue_until_it_is_started(
    svc: Services, sandbox: Sandbox, nodes: list[str], stub_python: str, slack: FakeSlack, worker: InlineWorker
) -> None:
    """`stop a` of an a,b run stops both nodes and holds both queues: a run queued on b waits
    for `/runctl start b` (the stop says so) instead of being started on a stopped instance,
    failing and dropped."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    ec2.create_tags(Resources=nodes, Tags=[{"Key": PYTHON_TAG, "Value": stub_python}])
    run_id = start(nodes, "--epochs", "50", "--steps-per-epoch", "5", "--step-seconds", "0.05", deps=False)
    carol = TrainCommand(instance_id=nodes[1], script="train_with_checkpoints.py", deps=False, queue=True)
    queued.add(carol.model_dump(mode="json"), Actor(user_id="U0CAROL", channel_id="C0TRAIN").model_dump(mode="json"))
    [entry] = QueueStore(svc.redis).entries(nodes[1])

    said = stop(StopCommand(instance_id=nodes[0]).model_dump(mode="json"), ALICE.model_dump(mode="json"))
    assert "stopped" in said, said
    queued.fallback(svc)  # the monitor tick's fallback, which starts what a free instance has queued
    worker.drain(timeout=60)

    run = svc.runs.get(run_id)
    assert run is not None and run.state is RunState.STOPPED
    assert [svc.fleet.get(iid).state for iid in nodes] == ["stopped", "stopped"]
    assert [e.entry_id for e in QueueStore(svc.redis).entries(nodes[1])] == [entry.entry_id]  # still waiting
    assert "was not started" not in "\n".join(m.text for m in slack.ephemerals("U0CAROL"))
    summary = [m.text + str(m.blocks) for m in slack.messages("C0TRAIN") if "stopped *" in m.text]
    assert any(f"`/runctl start {nodes[1]}`" in t for t in summary), summary
