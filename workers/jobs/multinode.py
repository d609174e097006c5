"""One run across several instances, on torchrun: `/runctl train a,b[,…] script [--nproc-per-node N|auto]`.

The flow of a single-node train (workers/jobs/train.py), for a node set: pre-flight on every node
before anything starts (state, agent, same type, region and VPC, torch importable, no live
training, node 0's rendezvous port free and reachable from every other node over TCP); every
node's train lock taken at once or none (workers/state/locks.py `acquire_all`); the code shipped
to every node and torchrun started detached on each (workers/remote/torchrun.py); one parent
message. The monitor polls every node and ends the run once every node's torchrun has exited.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from decimal import Decimal
from typing import TYPE_CHECKING

from workers import policy, remote
from workers.aws.instance import Instance, ScriptResult
from workers.code import envs
from workers.commands import INSTANCE_ID, Actor, TrainCommand
from workers.cost.pricing import format_rate, hourly_price, load_price_book
from workers.errors import RunConflict, RunctlError
from workers.jobs.funnel import Job
from workers.jobs.preflight import Refusals, require_running
from workers.remote import torchrun
from workers.remote.lifecycle import parse_stop
from workers.services import Services
from workers.slack.escape import code, escape
from workers.slack.thread import open_run
from workers.state.locks import Holder, acquire_all, operation, release_all, train_lock
from workers.state.runs import Run, RunState

if TYPE_CHECKING:
    from workers.jobs.train import TrainFlow

PREFLIGHT_SECONDS = 120
LAUNCH_SECONDS = 600


class NodeRefused(RunctlError):
    """One or more nodes failed pre-flight; `why` has one line per node."""


def execute(flow: TrainFlow, cmd: TrainCommand) -> Run:
    return MultiNode(flow, cmd).execute()


def node_ids(svc: Services, first: str, cmd: TrainCommand) -> list[str]:
    """The node list as instance ids: node 0 as the funnel resolved it (`first`), the others' names resolved."""
    ids: list[str] = [first]
    for typed in cmd.nodes[1:]:
        iid = typed if INSTANCE_ID.fullmatch(typed) else svc.fleet.named(typed).id
        if iid in ids:
            raise RunctlError(
                f"{code(typed)} names an instance already in the node list.", fix="Give each instance once."
            )
        ids.append(iid)
    return ids


def check_rights(svc: Services, actor: Actor, cmd: TrainCommand, ids: list[str]) -> None:
    """The requester's `train` right on every node after node 0 (the funnel checked node 0)."""
    for iid in ids[1:]:
        one = cmd.model_copy(update={"instance_id": iid, "nodes": ()})
        tags = (lambda i: svc.fleet.get(i).tags) if policy.needs_owner(svc.settings, ["train"]) else None
        policy.recheck_command(svc.settings, actor, one, policy.owner_of(svc.redis, one, tags=tags))


class MultiNode:
    def __init__(self, flow: TrainFlow, cmd: TrainCommand) -> None:
        self.flow = flow
        self.job: Job = flow.job
        self.svc = flow.svc
        self.cmd = cmd
        self.run = flow.run
        self.root = flow.root
        self.port = self.svc.settings.RUNCTL_RDZV_PORT
        self.token: str | None = None

    # --- the flow -------------------------------------------------------------
    def execute(self) -> Run:
        run = self.run
        run.state = RunState.STARTING
        try:
            ids = self.resolve()
            source = self.flow.check_code()
            doing = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=self.svc.clock())
            with ExitStack() as held:
                for iid in sorted(ids):  # one order for everyone: two node sets never wait on each other
                    held.enter_context(operation(self.svc.redis, iid, doing))
                insts = self.check_instances(ids)
                pythons = [self.flow.interpreter(inst) for inst in insts]
                checks = self.check_nodes(insts, pythons)
                self.claim(ids)
                run.python = pythons[0]
                run.instance_name = insts[0].name
                nproc = self.workers_per_node(checks)
                run.notes.append(self.describe(insts, nproc))
                open_run(self.svc, run)
                self.flow.plan_checkpoints(source)
                self.requirements()
                self.launch(insts, pythons, nproc)
                self.flow.confirm_started()
                self.token = None  # the monitor owns the locks from here
        except RunctlError:
            started = run.started_at is not None
            self.job.failed_state = RunState.FAILED if started else RunState.REFUSED
            raise
        finally:
            if self.token:
                release_all(self.svc.redis, run.node_ids, self.token)
                self.token = None
        return run

    # --- pre-flight ---------------------------------------------------------------
    def resolve(self) -> list[str]:
        """Every node's instance id (names resolved as the funnel resolves node 0's), each
        checked against the policy as the funnel checks node 0."""
        svc, run = self.svc, self.run
        ids = node_ids(svc, run.instance_id, self.cmd)
        check_rights(svc, self.job.actor, self.cmd, ids)
        run.nodes = ids
        svc.runs.save(run)
        return ids

    def check_instances(self, ids: list[str]) -> list[Instance]:
        """State and agent of every node, then that they are alike: the reasons of every node at once."""
        fleet = self.svc.fleet
        insts: list[Instance] = []
        problems: list[str] = []
        for k, iid in enumerate(ids):
            try:
                inst = fleet.get(iid)
                require_running(
                    inst,
                    Refusals(
                        stopped=".",
                        stopped_why="A training needs running instances.",
                        stopped_fix=f"/runctl start {iid}",
                        gone="; it cannot run anything again.",
                        gone_fix="/runctl resources",
                        pending_why="Every node must be running before a multi-node run starts.",
                        pending_fix="Send the command again once it is running.",
                    ),
                )
                fleet.require_agent(inst, "runs commands")
                insts.append(inst)
            except RunctlError as exc:
                problems.append(node_line(k, iid, exc))
        if problems:
            raise refused(problems, len(ids))
        first = insts[0]
        if len({i.region for i in insts}) > 1 or len({i.vpc_id for i in insts}) > 1:
            problems.append(
                "the nodes are not in one region and VPC: "
                + ", ".join(f"{i.label} in {escape(i.region)} {escape(i.vpc_id or '?')}" for i in insts)
                + "; torchrun's nodes reach each other by private IP"
            )
        if len({i.type for i in insts}) > 1:
            problems.append(
                "the nodes are of different types ("
                + ", ".join(f"{i.label}: {code(i.type)}" for i in insts)
                + "): a distributed run steps at the pace of its slowest node, and `--nproc-per-node auto` "
                "would start different numbers of workers"
            )
        if not all(i.private_ip for i in insts):
            problems.append("a node has no private IP: " + ", ".join(i.label for i in insts if not i.private_ip))
        if problems:
            raise refused(problems, len(ids), fix="Pick instances of one type, in one VPC.")
        self.run.spot = first.lifecycle == "spot"
        return insts

    def check_nodes(self, insts: list[Instance], pythons: list[str]) -> list[torchrun.NodeCheck]:
        """One script on every node: GPUs, torch, live trainings; node 0 can bind the rendezvous
        port, every other node reaches node 0's private IP on it over TCP."""
        fleet = self.svc.fleet
        head = insts[0]
        sent = [
            (
                inst,
                fleet.send(
                    [inst.id],
                    torchrun.preflight(self.root, pythons[k], self.port, None if k == 0 else head.private_ip),
                    PREFLIGHT_SECONDS,
                ),
            )
            for k, inst in enumerate(insts)
        ]
        results = wait_all(self, [(inst.id, cid) for inst, cid in sent], PREFLIGHT_SECONDS)
        checks: list[torchrun.NodeCheck] = []
        problems: list[str] = []
        for k, inst in enumerate(insts):
            result = results[inst.id]
            check = torchrun.parse_preflight(result.stdout)
            checks.append(check)
            where = f"node {k}, {inst.label}"
            if not result.ok:
                problems.append(f"{where}: the pre-flight script failed (exit {result.exit_code})")
                continue
            if not check.torch:
                problems.append(
                    f"{where}: {code(pythons[k])} cannot import `torch.distributed.run` "
                    "(install PyTorch there, or tag the instance `runctl:python` with an interpreter that has it)"
                )
            for rid, pid in check.live:
                holder = self.svc.runs.get(rid)
                who = f"<@{holder.user_id}>'s run `{rid}`" if holder else f"run `{rid}`"
                problems.append(f"{where}: busy, {who} is training there (pid {pid})")
            if k == 0 and check.bind != "free":
                problems.append(
                    f"{where}: TCP port {self.port} (the rendezvous port) is in use, or could not be checked"
                )
            if k > 0 and check.reach != "refused":
                problems.append(f"{where}: " + self.reach_problem(check.reach, head))
        if problems:
            raise refused(
                problems,
                len(insts),
                fix=f"Allow inbound TCP {self.port} between the nodes: `aws ec2 authorize-security-group-ingress "
                f"--group-id <node 0's security group> --protocol tcp --port {self.port} "
                "--source-group <the nodes' security group>`"
                if any(k > 0 and c.reach == "timeout" for k, c in enumerate(checks))
                else "",
            )
        return checks

    def reach_problem(self, reach: str, head: Instance) -> str:
        target = f"node 0's private IP {code(head.private_ip)} on TCP port {self.port}"
        if reach == "timeout":
            return (
                f"cannot reach {target} (the connection timed out: a security group drops it). "
                f"Add an inbound rule to node 0's security group: TCP {self.port} from the nodes' security group"
            )
        if reach == "open":
            return f"found something already listening at {target}; the rendezvous needs that port free"
        return f"could not check {target} ({escape(reach or 'no answer')})"

    def claim(self, ids: list[str]) -> None:
        """Every node's train lock, or none: refused at once while any is held."""
        run = self.run
        token = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=self.svc.clock()).token()
        busy = acquire_all(self.svc.redis, ids, token)
        if busy is not None:
            holder = Holder.model_validate_json(raw) if (raw := _raw_lock(self, busy)) else None
            who = f"<@{holder.user_id}>'s run `{holder.run_id}`" if holder else "another run"
            raise RunConflict(
                f"{busy} is busy: {who} holds it; none of the nodes was taken.",
                why="One training per instance, and a multi-node run takes all of its nodes or none.",
                fix=f"wait for it to finish, or `/runctl stop {busy}`.",
            )
        self.token = token
        run.lock_token = token
        self.svc.runs.save(run)

    def workers_per_node(self, checks: list[torchrun.NodeCheck]) -> int:
        asked = self.run.nproc_per_node or "auto"
        if asked != "auto":
            return int(asked)
        return max(1, min(c.gpus for c in checks))

    def requirements(self) -> None:
        if not self.run.deps:
            return
        reqs = envs.find(self.svc.repo, self.run.sha, self.run.script)
        if reqs is not None and not reqs.empty:
            raise RunctlError(
                f"{code(reqs.source)} names packages; building an environment on every node is not "
                "supported for a multi-node run yet.",
                fix="Install them on the nodes' interpreter and add `--no-deps`.",
            )

    def rate(self, insts: list[Instance]) -> str:
        """The node set's price: the sum of every node's hourly price (unknown if any is)."""
        total = Decimal(0)
        for inst in insts:
            lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
            try:
                price = hourly_price(
                    load_price_book(),
                    self.svc.fleet,
                    self.svc.redis,
                    inst.region,
                    inst.availability_zone,
                    inst.type,
                    lifecycle,
                )
            except RunctlError:
                return "its price per hour is unknown"
            if price.usd_per_hour is None:
                return "its price per hour is unknown"
            total += price.usd_per_hour
        return f"costs ${format_rate(total)}/h for all {len(insts)} nodes"

    def describe(self, insts: list[Instance], nproc: int) -> str:
        nodes = "; ".join(f"node {k}: {i.label} ({code(i.private_ip)})" for k, i in enumerate(insts))
        return (
            f":link: One run on {len(insts)} nodes with torchrun, {nproc} worker{'s' if nproc != 1 else ''} "
            f"per node (world size {nproc * len(insts)}), c10d rendezvous at "
            f"{code(f'{insts[0].private_ip}:{self.port}')}: {nodes}. Checkpoints are rank 0's, on node 0; "
            f"`/runctl stop {insts[0].id}` stops every node. The run {self.rate(insts)}."
        )

    # --- launch -------------------------------------------------------------------
    def launch(self, insts: list[Instance], pythons: list[str], nproc: int) -> None:
        """Ship the code to every node and start torchrun detached on each, all at once; a node
        that fails stops the others (SIGTERM) and fails the run."""
        run, fleet = self.run, self.svc.fleet
        url = self.flow.bundle_url()
        head = insts[0]
        sent: list[tuple[str, str]] = []
        for k, inst in enumerate(insts):
            words = torchrun.launcher(
                len(insts), k, nproc, head.private_ip, self.port, run.run_id, inst.private_ip or head.private_ip
            )
            body = self.flow.launch_body(pythons[k], launcher=words)
            script = remote.deliver(self.root, run.run_id, run.script, url, body)
            sent.append((inst.id, fleet.send([inst.id], script, LAUNCH_SECONDS)))
        results = wait_all(self, sent, LAUNCH_SECONDS)
        bad = [(k, inst) for k, inst in enumerate(insts) if not results[inst.id].ok]
        if bad:
            started = [inst.id for inst in insts if results[inst.id].ok]
            self.stop_nodes(started)
            k, inst = bad[0]
            res = results[inst.id]
            said = (res.stderr or res.stdout).strip()[-600:]
            busy = res.exit_code == remote.BUSY_EXIT
            raise RunctlError(
                f"Launching on node {k}, {inst.label}, failed (exit {res.exit_code}); "
                + (f"stopped the {len(started)} node(s) that had started." if started else "nothing was started."),
                why="Another training is alive there (its pid file says so)." if busy else "",
                detail=said,
                fix=f"/runctl status {inst.id}",
            )
        self.svc.runs.also_on(run, [inst.id for inst in insts[1:]])
        self.flow.mark_started()

    def stop_nodes(self, ids: list[str]) -> None:
        grace = self.svc.settings.RUNCTL_STOP_GRACE_SECONDS
        if not ids:
            return
        cid = self.svc.fleet.send(ids, remote.stop_run(self.root, self.run.run_id, grace), grace + 60)
        for iid, res in wait_all(self, [(i, cid) for i in ids], grace + 60).items():
            if parse_stop(res.stdout) is None:
                self.run.notes.append(f":warning: could not confirm that run {code(self.run.run_id)} stopped on {iid}.")


def _raw_lock(flow: MultiNode, instance_id: str) -> str | None:
    return train_lock(flow.svc.redis, instance_id).raw()


def wait_all(flow: MultiNode, sent: list[tuple[str, str]], timeout: float) -> dict[str, ScriptResult]:
    return _wait(flow.svc, sent, timeout)


def _wait(svc: Services, sent: list[tuple[str, str]], timeout: float) -> dict[str, ScriptResult]:
    """The results of commands sent one per instance, polled together until all are in."""
    fleet = svc.fleet
    done: dict[str, ScriptResult] = {}
    deadline = time.monotonic() + timeout + 30
    delay = 0.1
    while len(done) < len(sent):
        for iid, cid in sent:
            if iid not in done and (res := fleet.result(cid, iid)) is not None:
                done[iid] = res
        if len(done) < len(sent):
            if time.monotonic() > deadline:
                missing = [iid for iid, _ in sent if iid not in done]
                raise RunctlError(f"No answer from {', '.join(missing)} within {int(timeout)} s.")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
    return done


def node_line(k: int, iid: str, exc: RunctlError) -> str:
    why = f" ({exc.why.rstrip('.')})" if exc.why else ""
    fix = f"; fix: {code(exc.fix) if exc.fix.startswith('/runctl') else exc.fix}" if exc.fix else ""
    return f"node {k} ({iid}): {exc.what.rstrip('.')}{why}{fix}"


def refused(problems: list[str], count: int, fix: str = "") -> NodeRefused:
    return NodeRefused(
        f"Not started: the pre-flight of this {count}-node run failed; nothing was started.",
        why="\n".join(f"• {p}" for p in problems),
        fix=fix or "Fix each node as said, then send the same command again.",
    )


def signal_nodes(svc: Services, run: Run, script: str, timeout: int) -> ScriptResult:
    """A stop script (`remote.stop_run`) on every node of a multi-node run in one command: each
    torchrun gets SIGTERM at once and forwards it to its workers, which agree to stop after the
    same step; rank 0 saves. Node 0's result (its checkpoint) is the run's; a node that did not
    confirm is noted on the run."""
    ids = run.node_ids
    cid = svc.fleet.send(ids, script, timeout)
    results = _wait(svc, [(iid, cid) for iid in ids], timeout)
    for k, iid in enumerate(ids[1:], start=1):
        res = results.get(iid)
        if res is None or parse_stop(res.stdout) is None:
            run.notes.append(f":warning: could not confirm that torchrun stopped on node {k} ({iid}).")
    return results[ids[0]]
