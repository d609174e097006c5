"""Run records: one JSON document per run in Redis, plus per-instance history."""

from __future__ import annotations

import re
import secrets
import signal
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field
from redis import Redis

from workers.commands import Actor, TrainCommand
from workers.context import Context
from workers.errors import ErrorInfo

HISTORY = 50
# runctl's run ids (new_run_id's, and tests' `r-…`). No `:`, so no id names another key
# (`runctl:run:<id>` is a run's record and nothing else); nothing Slack or a shell reads specially.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
# How a run ended: it exited by itself, a stop/terminate (or --force) ended it, or it was lost.
EndedBy = Literal["", "exit", "stop", "terminate", "force", "lost"]
# Options whose values are where scripts save: checkpoint discovery looks there too.
DIR_OPTIONS = ("--checkpoint-dir", "--checkpoint_dir", "--output-dir", "--output_dir", "--save-dir", "--save_dir")


class RunState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    SETTING_UP = "setting up environment"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    REFUSED = "not started"
    LOST = "lost"

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.REFUSED, RunState.LOST}

# 128 + the signal: a training that exits so after SIGINT/SIGTERM was stopped, not broken
# (the example scripts save, then exit 130/143 so that `train && evaluate` goes no further).
STOP_SIGNALS = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}


def ended_state(exit_code: int) -> RunState:
    """The state of a run whose training exited with `exit_code` on its own."""
    if exit_code == 0:
        return RunState.SUCCEEDED
    return RunState.STOPPED if exit_code in STOP_SIGNALS else RunState.FAILED


class Progress(BaseModel):
    epoch: int | None = None
    total_epochs: int | None = None
    done_epochs: int | None = None  # epochs finished, where it differs from `epoch` (one just started)
    step: int | None = None
    total_steps: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    eta_seconds: float | None = None
    updated_at: datetime | None = None
    source: str = "file"


class Checkpoint(BaseModel):
    name: str
    size: int
    modified_at: datetime
    epoch: int | None = None


class RunLink(BaseModel):
    """A tracker's page the run's log announced, checked against its host (workers/slack/links.py)."""

    kind: str
    url: str


class Outcome(BaseModel):
    """What the end of a run found on its instance (workers/jobs/summary.py), kept for its final
    message: its cost (escaped mrkdwn) and its trackers' links."""

    cost: str = ""
    links: list[RunLink] = Field(default_factory=list)


class Gpu(BaseModel):
    """One GPU as nvidia-smi reported it in the monitor's poll; None where it said [N/A]."""

    index: int
    utilization: float | None = None  # percent
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None


class NodeState(BaseModel):
    """One node of a multi-node run as the monitor's newest poll saw it (workers/remote/torchrun.py)."""

    instance_id: str
    state: Literal["alive", "exited", "starting", "no answer"]
    exit_code: int | None = None
    gpus: list[Gpu] | None = None  # None: no nvidia-smi there (or it did not answer)


class Run(BaseModel):
    run_id: str
    instance_id: str
    user_id: str
    channel_id: str
    script: str
    args: tuple[str, ...] = ()
    ref: str = "main"
    sha: str = ""
    sync_code: bool = True
    wait: bool = True
    deps: bool = True
    rebuild_env: bool = False
    checkpoint_interval: int | None = None
    checkpoint_run_id: str | None = None  # a resumed run reuses its predecessor's directory
    pass_checkpoint_dir: bool = False  # runctl adds `--checkpoint-dir "$RUNCTL_CHECKPOINT_DIR"`
    backup: bool = False  # `train --backup`: the monitor queues a backup at each new checkpoint
    restore_from: str | None = None  # the run whose S3 backup fills in missing checkpoints before the start
    state: RunState = RunState.QUEUED
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    ended_by: EndedBy = ""
    then: str = "keep"  # "stop" | "terminate" | "keep": what happens to the instance when the run ends
    message_ts: str | None = None
    # The command's response_url: answers the requester privately in any conversation for
    # 30 minutes (5 messages), when the channel refuses the bot.
    response_url: str | None = Field(None, repr=False)
    progress: Progress | None = None
    checkpoint: Checkpoint | None = None
    python: str = ""  # the interpreter the run was set up with (RUNCTL_PYTHON or the runctl:python tag)
    env_hash: str | None = None
    env_built_at: datetime | None = None
    setup_seconds: float | None = None
    notes: list[str] = Field(default_factory=list)
    stopped_by: str = ""  # who stopped or terminated it through runctl
    instance_name: str = ""  # its Name tag when the run started, shown beside the id
    notes_told: int = 0  # how many of the notes were said in the thread (each once)
    log_tail: str = ""
    gpus: list[Gpu] | None = None  # the newest poll's; None: no nvidia-smi on the instance
    gpu_idle_since: datetime | None = None  # since when every GPU has been near 0 %
    auto_resume: bool = False  # after a spot interruption, a replacement from the same preset continues it
    spot: bool = False  # on a spot instance: its wrapper watches for interruption notices
    spot_notice: str = ""  # the interruption notice the wrapper acted on (IMDS's JSON)
    spot_signalled_at: datetime | None = None  # when the wrapper SIGTERMed the training for it
    error: ErrorInfo | None = None
    outcome: Outcome | None = None  # the end's summary: cost and links (workers/jobs/summary.py)
    polls: int = 0
    lock_token: str = ""
    # A multi-node run (workers/jobs/multinode.py): its instances, node 0 (= instance_id) first; [] for one.
    nodes: list[str] = Field(default_factory=list)
    nproc_per_node: str = ""  # torchrun's --nproc-per-node, as sent ("auto": each node's GPUs, else 1)
    failure: str = ""  # which node and rank failed, and its exception line (Slack text)
    node_states: list[NodeState] = Field(default_factory=list)  # a multi-node run's nodes, newest poll

    @property
    def node_ids(self) -> list[str]:
        """Every instance the run holds: its nodes, or its one instance."""
        return list(self.nodes) or [self.instance_id]

    @property
    def command_text(self) -> str:
        import shlex

        parts = ["/runctl", "train", self.instance_id, self.script, "--ref", self.ref]
        if self.args:
            parts += ["--", *self.args]
        return shlex.join(parts)


class RunMeta(BaseModel):
    """What the instance keeps about a run in `runs/<id>/meta.json`: enough to rebuild its
    record (and find its Slack thread) when Redis has lost it. The bot signs it
    (workers/state/records.py); unsigned, it is only an instance's claim."""

    run_id: str
    instance_id: str = ""  # the instance it was started on
    user: str
    channel: str = ""
    ts: str | None = None  # the parent message
    script: str
    ref: str = "main"
    sha: str = ""
    started_at: datetime | None = None
    checkpoint_dir: str = ""  # relative to the remote root
    checkpoint_run_id: str | None = None
    wait: bool = True
    then: str = "keep"
    nodes: list[str] = Field(default_factory=list)  # a multi-node run's instances, node 0 first
    sig: str = ""  # records.signed_meta's

    @classmethod
    def of(cls, run: Run, started_at: datetime) -> RunMeta:
        ck = run.checkpoint_run_id or run.run_id
        return cls(
            run_id=run.run_id,
            instance_id=run.instance_id,
            user=run.user_id,
            channel=run.channel_id,
            ts=run.message_ts,
            script=run.script,
            ref=run.ref,
            sha=run.sha,
            started_at=started_at,
            checkpoint_dir=f"runs/{ck}/checkpoints",
            checkpoint_run_id=run.checkpoint_run_id,
            wait=run.wait,
            then=run.then,
            nodes=list(run.nodes),
        )

    def rebuild(self) -> Run:
        """The run record this metadata describes, as running (a multi-node run with every node)."""
        return Run(
            run_id=self.run_id,
            instance_id=self.instance_id,
            nodes=list(self.nodes),
            user_id=self.user,
            channel_id=self.channel,
            script=self.script,
            ref=self.ref,
            sha=self.sha,
            wait=self.wait,
            then=self.then,
            checkpoint_run_id=self.checkpoint_run_id,
            state=RunState.RUNNING,
            created_at=self.started_at or datetime.now(UTC),
            started_at=self.started_at,
            message_ts=self.ts,
        )


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"r{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_run(svc: Context, cmd: TrainCommand, actor: Actor, run_id: str) -> Run:
    """The queued run of a train command: the actor's, with the settings' ref and `--then` by default."""
    return Run(
        run_id=run_id,
        instance_id=cmd.instance_id,
        user_id=actor.user_id,
        channel_id=actor.channel_id,
        script=cmd.script,
        args=cmd.args,
        ref=cmd.ref or svc.settings.RUNCTL_REF,
        sync_code=cmd.sync_code,
        wait=cmd.wait,
        deps=cmd.deps,
        rebuild_env=cmd.rebuild_env,
        checkpoint_interval=cmd.checkpoint_interval,
        then=cmd.then or svc.settings.RUNCTL_THEN,
        backup=cmd.backup,
        auto_resume=cmd.auto_resume,
        nodes=list(cmd.nodes),
        nproc_per_node=cmd.nproc_per_node or ("auto" if cmd.nodes else ""),
        created_at=svc.clock(),
        response_url=actor.response_url,
    )


def option_values(args: tuple[str, ...] | list[str], names: tuple[str, ...]) -> list[str]:
    """The values given to any of `names` (`--opt VALUE` or `--opt=VALUE`), in order."""
    found: list[str] = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                found.append(value)
            elif i + 1 < len(args):
                found.append(args[i + 1])
    return [v for v in found if v]


# KEYS: the instance's run list, the live set. ARGV: how many of the newest make the history.
# Returns (record, live 0/1, in history 0/1) triples: the first `count` runs, and the newest
# live one among all HISTORY listed, each once.
_ON_INSTANCE = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local count, out, found = tonumber(ARGV[1]), {}, false
for i, id in ipairs(ids) do
  local live = 0
  if not found and redis.call('SISMEMBER', KEYS[2], id) == 1 then live = 1 end
  local listed = 0
  if i <= count then listed = 1 end
  if live == 1 or listed == 1 then
    local raw = redis.call('GET', 'runctl:run:' .. id)
    if raw then
      out[#out + 1] = raw
      out[#out + 1] = live
      out[#out + 1] = listed
      if live == 1 then found = true end
    end
  end
  if found and i >= count then break end
end
return out
"""


class RunStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def _key(run_id: str) -> str:
        return f"runctl:run:{run_id}"

    def create(self, run: Run) -> Run:
        pipe = self.redis.pipeline()
        pipe.set(self._key(run.run_id), run.model_dump_json())
        if run.state is not RunState.REFUSED:
            pipe.lpush(f"runctl:runs:instance:{run.instance_id}", run.run_id)
            pipe.ltrim(f"runctl:runs:instance:{run.instance_id}", 0, HISTORY - 1)
        pipe.zadd("runctl:runs:all", {run.run_id: run.created_at.timestamp()})
        pipe.execute()
        return run

    def also_on(self, run: Run, instance_ids: Sequence[str]) -> None:
        """A multi-node run in its other nodes' histories too: their owner, newest run and logs are its."""
        pipe = self.redis.pipeline()
        for iid in instance_ids:
            pipe.lpush(f"runctl:runs:instance:{iid}", run.run_id)
            pipe.ltrim(f"runctl:runs:instance:{iid}", 0, HISTORY - 1)
        pipe.execute()

    def adopt(self, run: Run) -> bool:
        """Create the record only if none exists (SET NX): of two reconciles, one adopts."""
        if not self.redis.set(self._key(run.run_id), run.model_dump_json(), nx=True):
            return False
        self.create(run)
        self.save(run)
        return True

    def claim_end(self, run_id: str) -> bool:
        """The one right to report a run's end: whoever sees it first (monitor tick, a second
        worker's tick, the reconcile) reports it; the others stay quiet. Its key is outside
        `runctl:run:`, so no run record can take it."""
        return bool(self.redis.set(f"runctl:run-end:{run_id}", "1", nx=True, ex=30 * 86400))

    def get(self, run_id: str) -> Run | None:
        raw = self.redis.get(self._key(run_id))
        return Run.model_validate_json(raw) if raw else None

    def save(self, run: Run) -> Run:
        pipe = self.redis.pipeline()
        pipe.set(self._key(run.run_id), run.model_dump_json())
        if run.state.ended:
            pipe.srem("runctl:runs:live", run.run_id)
        elif run.lock_token or run.state in (RunState.RUNNING, RunState.SETTING_UP, RunState.STOPPING):
            pipe.sadd("runctl:runs:live", run.run_id)  # live from the moment it takes the train lock
        if run.state is RunState.REFUSED:  # it never ran: it never displaces the instance's last real run
            pipe.lrem(f"runctl:runs:instance:{run.instance_id}", 0, run.run_id)
        pipe.execute()
        return run

    def live(self) -> list[Run]:
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in self.redis.smembers("runctl:runs:live"))
        runs = self.get_many(ids)
        return [runs[i] for i in ids if i in runs]

    def history(self, instance_id: str, count: int = 10) -> list[Run]:
        """The instance's runs, newest first; refused ones (never started) are not its history."""
        ids = [_text(i) for i in self.redis.lrange(f"runctl:runs:instance:{instance_id}", 0, count - 1)]
        runs = self.get_many(ids)
        return [runs[i] for i in ids if i in runs and runs[i].state is not RunState.REFUSED]

    def on_instance(self, instance_id: str, count: int = 10) -> tuple[Run | None, list[Run]]:
        """(`live_on`, `history(count)`) of one instance in one round trip, reading only that
        instance's runs: the front door asks it for every command that names an instance, and
        reading every live run there cost O(live runs) per command (issue 28)."""
        reply = self.redis.eval(_ON_INSTANCE, 2, f"runctl:runs:instance:{instance_id}", "runctl:runs:live", count)
        live: Run | None = None
        history: list[Run] = []
        for i in range(0, len(reply), 3):
            raw, is_live, in_history = reply[i], int(reply[i + 1]), int(reply[i + 2])
            run = Run.model_validate_json(raw)
            if is_live and live is None and instance_id in run.node_ids:
                live = run
            if in_history and run.state is not RunState.REFUSED:
                history.append(run)
        return live, history

    def latest(self, instance_id: str) -> Run | None:
        found = self.history(instance_id, 1)
        return found[0] if found else None

    def get_many(self, run_ids: Sequence[str]) -> dict[str, Run]:
        """The runs that exist among ``run_ids``, in one MGET."""
        raws = self.redis.mget([self._key(i) for i in run_ids]) if run_ids else []
        return {i: Run.model_validate_json(raw) for i, raw in zip(run_ids, raws, strict=True) if raw}

    def latest_many(self, instance_ids: Iterable[str]) -> dict[str, Run]:
        """``latest`` for many instances in two round trips; instances with no run are left out."""
        ids = list(instance_ids)
        pipe = self.redis.pipeline(transaction=False)
        for instance_id in ids:
            pipe.lindex(f"runctl:runs:instance:{instance_id}", 0)
        heads = pipe.execute() if ids else []
        run_ids = {iid: _text(head) for iid, head in zip(ids, heads, strict=True) if head is not None}
        runs = self.get_many(list(run_ids.values()))
        return {iid: runs[rid] for iid, rid in run_ids.items() if rid in runs}

    def live_on(self, instance_id: str) -> Run | None:
        """The instance's live run (one train lock per instance): found among the instance's
        own runs (its last HISTORY), not by reading every live run."""
        return self.on_instance(instance_id, 0)[0]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
