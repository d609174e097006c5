"""A run across several instances on PyTorch's launcher, torchrun (`python -m torch.distributed.run`):
the pre-flight each node answers, the launcher's words, and the merge of the nodes' snapshots.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT``, user values through
``shlex.quote``, and what an instance wrote read back only from framed records.

torchrun's options are its documented ones (https://docs.pytorch.org/docs/stable/elastic/run.html):
``--nnodes``, ``--node-rank``, ``--nproc-per-node``, ``--rdzv-backend c10d``, ``--rdzv-endpoint
host:port``, ``--rdzv-id``, ``--rdzv-conf is_host=…`` (whether this node hosts the c10d store;
torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py reads it), ``--local-addr`` (the
address this node is reached by) and ``--max-restarts``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workers.remote import frame
from workers.remote.core import _probe_body
from workers.remote.shell import SECTION, header, interpreter, q
from workers.remote.status import Snapshot
from workers.state.runs import NodeState

CONNECT_SECONDS = 5  # a security group drops what it does not allow: the connect times out

# Run by the training interpreter: reach host:port once. "refused" is an answer from the host
# (the port is allowed, nothing listens there yet), "open" means something already listens,
# "timeout" is what a security group that does not allow the port gives (it drops, never answers).
_PY_CONNECT = """import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print("error", e.errno)
"""
# Node 0: can the rendezvous store bind its port? With SO_REUSEADDR, so that the TIME_WAIT
# connections a previous run on that port left do not count, only a listener does: torchrun's
# store binds the port again in that state (tests/test_multinode_torch.py resumes on the same
# port right after a stop; a plain bind there failed with EADDRINUSE).
_PY_BIND = """import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", int(sys.argv[1])))
    print("free")
except OSError as e:
    print("busy", e.errno)
"""


def preflight(root: str, python: str, port: int, connect_to: str | None) -> str:
    """One node's answers, as records: `gpus N`, `torch 0|1`, `live <run> <pid>` for live
    trainings, and on node 0 `bind free|busy`, on the others `reach refused|open|timeout|…`."""
    py = interpreter(python)
    s = SECTION
    lines = [
        header(root),
        "n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)\n",
        f'echo "{s}gpus ${{n:-0}}"\n',
        f'if {py} -c "import torch.distributed.run" >/dev/null 2>&1; then echo "{s}torch 1"; else echo "{s}torch 0"; fi\n',
        "live=$(\n" + _probe_body() + ")\n",
        f"printf '%s\\n' \"$live\" | while read -r word rid pid; do "
        f'[ "$word" = live ] && echo "{s}live $rid $pid"; done\n',
    ]
    if connect_to is None:
        lines.append(f"said=$({py} -c {q(_PY_BIND)} {int(port)} 2>/dev/null || echo none)\n")
        lines.append(f'echo "{s}bind $said"\n')
    else:
        lines.append(f"REACH_HOST={q(connect_to)}\n")
        lines.append(
            f'said=$({py} -c {q(_PY_CONNECT)} "$REACH_HOST" {int(port)} {CONNECT_SECONDS} 2>/dev/null || echo none)\n'
        )
        lines.append(f'echo "{s}reach $said"\n')
    return "".join(lines)


@dataclass
class NodeCheck:
    gpus: int = 0
    torch: bool = False
    live: list[tuple[str, str]] = field(default_factory=list)  # (run id, pid)
    bind: str = ""  # node 0
    reach: str = ""  # the others


_WORD = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_preflight(output: str) -> NodeCheck:
    check = NodeCheck()
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        parts = rest.split()
        if word == "gpus" and parts and parts[0].isdigit():
            check.gpus = min(int(parts[0]), 64)
        elif word == "torch":
            check.torch = rest.strip() == "1"
        elif word == "live" and len(parts) == 2 and _WORD.fullmatch(parts[0]) and parts[1].isdigit():
            check.live.append((parts[0], parts[1]))
        elif word == "bind" and parts and parts[0] in ("free", "busy", "none"):
            check.bind = parts[0]
        elif word == "reach" and parts and parts[0] in ("refused", "open", "timeout", "error", "none"):
            check.reach = parts[0]
    return check


def launcher(
    nodes: int, rank: int, nproc: int, endpoint: str, port: int, run_id: str, local_addr: str
) -> tuple[str, ...]:
    """The words between the interpreter (and its `-u`) and the script: torchrun as a module
    of the node's own interpreter, so no PATH lookup decides which torch runs."""
    return (
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--node-rank",
        str(rank),
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{endpoint}:{port}",
        "--rdzv-id",
        run_id,
        "--rdzv-conf",
        f"is_host={1 if rank == 0 else 0}",
        "--local-addr",
        local_addr,
        "--max-restarts",
        "0",
    )


# torchrun's error summary names the failing rank: "rank     : 1 (local_rank: 0)" in its
# ChildFailedError report (torch/distributed/elastic/multiprocessing/errors/__init__.py).
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank", re.MULTILINE)
# The last line of a Python traceback: `SomethingError: text` (possibly after a prefix torchrun adds).
_EXCEPTION = re.compile(r"(?:^|\]:?\s*)([A-Za-z_][A-Za-z0-9_.]*(?:Error|Exception|Failure|Interrupt)(?::.*)?)$")
# What the torn-down nodes say once a peer died: the consequence, not the cause.
_KNOCK_ON = re.compile(
    r"DistNetworkError|DistStoreError|RendezvousClosedError|RendezvousConnectionError|"
    r"Connection closed by peer|Connection reset by peer|ChildFailedError|SignalException|gloo",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class NodeFailure:
    node: int
    instance_id: str
    exit_code: int
    rank: int | None
    exception: str  # the exception line, as the instance wrote it (escape before showing)


def exception_line(log: Sequence[str]) -> str:
    """The last line that reads like a Python exception's, skipping torchrun's own summary."""
    for line in reversed(log):
        found = _EXCEPTION.search(line.strip())
        if found and "ChildFailedError" not in found.group(1):
            return found.group(1)[:300]
    return ""


def failure_report(root: str, run_id: str) -> str:
    """What a failed node's training.log says beyond its tail: the lines that read like Python
    exceptions (the newest 8) and torchrun's first `rank : N (local_rank…)` (its root cause)."""
    return (
        header(root)
        + frame.ENC
        + f'log="$RUNCTL_ROOT/runs/"{q(run_id)}/training.log\n'
        + f"echo \"{SECTION}exc $(grep -E '(^|]:? *)[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Failure|Interrupt)(:|$)' "
        + '"$log" 2>/dev/null | tail -n 8 | cut -c1-300 | enc)"\n'
        + f'echo "{SECTION}rank $(grep -E \'^ *rank *: *[0-9]+ *[(]local_rank\' "$log" 2>/dev/null | head -n 1 | enc)"\n'
    )


def parse_failure_report(output: str) -> tuple[int | None, list[str]]:
    rank: int | None = None
    lines: list[str] = []
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        said = frame.text(rest.strip()) or ""
        if word == "exc":
            lines = said.splitlines()
        elif word == "rank":
            found = _RANK.search(said)
            rank = int(found.group(1)) if found else None
    return rank, lines


def failure(
    nodes: Sequence[str],
    snaps: Mapping[str, Snapshot | None],
    reports: Mapping[str, tuple[int | None, list[str]]] | None = None,
) -> NodeFailure | None:
    """Which node failed: of those whose torchrun exited non-zero, the first whose exception is
    the script's own rather than the knock-on of a peer's death; else the first that failed.
    `reports`: each failed node's `failure_report`, else its log tail is all there is."""
    failed: list[NodeFailure] = []
    for k, iid in enumerate(nodes):
        snap = snaps.get(iid)
        if snap is None or snap.exit_code in (None, 0):
            continue
        rank, lines = (reports or {}).get(iid, (None, []))
        if rank is None:
            ranks = _RANK.findall("\n".join(snap.log))
            rank = int(ranks[0]) if ranks else None
        failed.append(NodeFailure(k, iid, snap.exit_code, rank, exception_line(lines or snap.log)))
    if not failed:
        return None
    own = [f for f in failed if f.exception and not _KNOCK_ON.search(f.exception)]
    return (own or failed)[0]


def merge(nodes: Sequence[str], snaps: Mapping[str, Snapshot | None]) -> Snapshot:
    """One snapshot for the run: progress, checkpoints and log from node 0 (rank 0 writes them),
    alive while any node's torchrun is, ended once every node's has; the exit code is 0 only if
    every node's was, else the failing node's (with its log)."""
    head = snaps.get(nodes[0])
    if head is None or head.missing:
        return Snapshot(missing=True)
    merged = Snapshot(
        alive=any(s is not None and s.alive for s in snaps.values()),
        has_pid=all(s is not None and s.has_pid for s in snaps.values()),
        wrapper_alive=any(s is not None and s.wrapper_alive for s in snaps.values()),
        instance_now=head.instance_now,
        progress=head.progress,
        checkpoint=head.checkpoint,
        log=list(head.log),
        gpus=[g for iid in nodes if (s := snaps.get(iid)) is not None for g in (s.gpus or [])] or None,
    )
    ended = [snaps.get(iid) for iid in nodes]
    if all(s is not None and s.ended for s in ended):
        failed = failure(nodes, snaps)
        if failed is None:
            merged.exit_code = 0 if all(s is not None and s.exit_code == 0 for s in ended) else head.exit_code
        else:
            merged.exit_code = failed.exit_code
            own = snaps.get(failed.instance_id)
            merged.log = list(own.log) if own is not None else merged.log
    return merged


def node_states(nodes: Sequence[str], snaps: Mapping[str, Snapshot | None]) -> list[NodeState]:
    """Each node's liveness for the run's message: its torchrun alive, exited (with its exit
    code), not started yet, or the node did not answer the poll; its GPUs when nvidia-smi said."""
    states: list[NodeState] = []
    for iid in nodes:
        snap = snaps.get(iid)
        if snap is None or snap.missing:
            states.append(NodeState(instance_id=iid, state="no answer"))
        elif snap.ended:
            states.append(NodeState(instance_id=iid, state="exited", exit_code=snap.exit_code))
        elif snap.alive:
            states.append(NodeState(instance_id=iid, state="alive", gpus=snap.gpus))
        else:
            states.append(NodeState(instance_id=iid, state="starting", gpus=snap.gpus))
    return states


def gone(nodes: Sequence[str], snaps: Mapping[str, Snapshot | None]) -> list[str]:
    """Nodes whose run directory is missing (a node replaced or wiped)."""
    return [iid for iid in nodes if (s := snaps.get(iid)) is None or s.missing]
