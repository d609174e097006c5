"""Parsed commands: what the grammar produces and what jobs receive."""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from workers.slack.escape import code

if TYPE_CHECKING:
    from workers.state.runs import Run

# An instance's `Name` tag as typed in chat; the funnel resolves it to the id within the scope.
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")


def instance_ref(raw: str) -> str:
    """An instance id, or a name (never one starting `i-`: a mistyped id is not a name)."""
    if INSTANCE_ID.fullmatch(raw) or (not raw.lower().startswith("i-") and INSTANCE_NAME.fullmatch(raw)):
        return raw
    raise ValueError("an instance id (i- and 8 or 17 hex digits) or an instance name")


InstanceId = Annotated[str, AfterValidator(instance_ref)]
SCRIPT_CHARS = re.compile(r"[A-Za-z0-9._/-]+")


def script_problem(path: str) -> str:
    """Why `path` is not a script runctl runs ("" if it is one): a relative path inside the
    repository, ending in .py, of letters, digits and `._-/` only, so no shell ever reads
    anything in it, with or without `--no-sync-code`."""
    norm = posixpath.normpath(path) if path else path
    bad = sorted({ch for ch in path if not SCRIPT_CHARS.fullmatch(ch)})
    if not path:
        return "is empty"
    if path.startswith("/") or path.startswith("~"):
        return "is absolute; give a path relative to the repository root"
    if ".." in path.split("/") or norm.startswith(".."):
        return "leaves the repository (`..`)"
    if "\\" in path:
        return "contains a backslash; use `/`"
    if bad:
        shown = " ".join(code(ch) for ch in bad[:5])  # the only untrusted part: Slack-safe
        return f"contains {shown}; a script path may hold only letters, digits and `._-/`"
    if not norm.endswith(".py"):
        return "is not a Python script (.py)"
    return ""


def _script(path: str) -> str:
    problem = script_problem(path)
    if problem:
        raise ValueError(f"the script path {problem}")
    return posixpath.normpath(path)


ScriptPath = Annotated[str, AfterValidator(_script)]
MAX_NODES = 16
Then = Literal["stop", "terminate", "keep"]


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str


class TrainCommand(Command):
    name: Literal["train"] = "train"
    instance_id: InstanceId
    script: ScriptPath
    ref: str | None = None
    sync_code: bool = True
    wait: bool = True
    force: bool = False
    checkpoint_interval: int | None = Field(None, ge=1, le=100_000)
    deps: bool = True
    rebuild_env: bool = False
    then: Then | None = None  # None: RUNCTL_THEN
    backup: bool = False  # each new checkpoint to S3 as the monitor sees it
    auto_resume: bool = False  # a spot interruption launches a replacement that continues the run
    queue: bool = False  # `--queue`: wait behind the instance's live run (workers/jobs/queued.py)
    args: tuple[str, ...] = ()
    # A multi-node run (workers/jobs/multinode.py): every node, node 0 first (= instance_id); () for one instance.
    nodes: tuple[InstanceId, ...] = Field((), max_length=MAX_NODES)
    nproc_per_node: str | None = Field(None, pattern=r"^(auto|[1-9][0-9]{0,2})$")  # None: auto

    @model_validator(mode="after")
    def _node_set(self) -> TrainCommand:
        if not self.nodes:
            if self.nproc_per_node is not None:
                raise ValueError("--nproc-per-node is for a run across several instances (a,b,...)")
            return self
        if len(self.nodes) < 2:
            raise ValueError("a multi-node run needs at least two instances")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("each instance may appear once in the node list")
        if self.nodes[0] != self.instance_id:
            raise ValueError("instance_id must be node 0")
        unsupported = [
            name
            for name, on in (
                ("--force", self.force),
                ("--auto-resume", self.auto_resume),
                ("--no-sync-code", not self.sync_code),
            )
            if on
        ]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} is not available for a multi-node run yet")
        return self

    @classmethod
    def from_run(cls, run: Run) -> TrainCommand:
        """The command that runs `run` again: same instance, script, ref, options and args."""
        return cls.model_validate(
            {
                "instance_id": run.instance_id,
                "script": run.script,
                "ref": run.ref,
                "sync_code": run.sync_code,
                "wait": run.wait,
                "checkpoint_interval": run.checkpoint_interval,
                "deps": run.deps,
                "then": run.then,
                "backup": run.backup,
                "auto_resume": run.auto_resume,
                "args": run.args,
                "nodes": tuple(run.nodes),
                "nproc_per_node": run.nproc_per_node or None,
            }
        )


class StatusCommand(Command):
    name: Literal["status"] = "status"
    instance_id: InstanceId


class HelpCommand(Command):
    name: Literal["help"] = "help"
    topic: str | None = None


class StopCommand(Command):
    name: Literal["stop"] = "stop"
    instance_id: InstanceId
    grace: int | None = Field(None, ge=0, le=3600)
    force: bool = False


class StartCommand(Command):
    name: Literal["start"] = "start"
    instance_id: InstanceId
    wait: bool = True


class TerminateCommand(Command):
    name: Literal["terminate"] = "terminate"
    instance_id: InstanceId


class ResourcesCommand(Command):
    name: Literal["resources"] = "resources"
    all: bool = False
    sort: Literal["cost", "uptime", "type"] = "cost"
    user: str | None = None  # a user id, or `@name` as typed (the job resolves it)


class CheckpointsCommand(Command):
    name: Literal["checkpoints"] = "checkpoints"
    instance_id: InstanceId
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class LogsCommand(Command):
    name: Literal["logs"] = "logs"
    instance_id: InstanceId
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    lines: int = Field(50, ge=1, le=500)
    grep: str | None = Field(None, min_length=1, max_length=200)
    node: int | None = Field(None, ge=0, lt=MAX_NODES)  # a multi-node run's node k (0: where rank 0 runs)


class ChartCommand(Command):
    name: Literal["chart"] = "chart"
    # An instance (its live run, else its newest) or a run id.
    target: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


class BackupCommand(Command):
    name: Literal["backup"] = "backup"
    instance_id: InstanceId
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ResumeCommand(Command):
    name: Literal["resume"] = "resume"
    run_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    instance_id: InstanceId | None = None  # --on: another instance than the run's


class AuditCommand(Command):
    name: Literal["audit"] = "audit"
    count: int = Field(20, ge=1, le=200)
    instance_id: InstanceId | None = None
    user: str | None = None  # a user id, or `@name` as typed (the job resolves it)


class LaunchCommand(Command):
    name: Literal["launch"] = "launch"
    target: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a preset, or an instance type
    spot: bool = False
    region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    instance_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
    disk: int | None = Field(None, ge=8, le=16384)


class QueueCommand(Command):
    """`/runctl queue [instance]` lists the queued runs; `/runctl queue cancel <id>` cancels one."""

    name: Literal["queue"] = "queue"
    instance_id: InstanceId | None = None
    cancel: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


AUTOSTOP_MIN_MINUTES = 5  # a sweep runs every few minutes: a shorter autostop could not be kept


class AutostopCommand(Command):
    name: Literal["autostop"] = "autostop"
    instance_id: InstanceId
    minutes: int | None = Field(None, ge=AUTOSTOP_MIN_MINUTES, le=7 * 24 * 60)  # None: off


AnyCommand = (
    TrainCommand
    | StatusCommand
    | HelpCommand
    | StopCommand
    | StartCommand
    | TerminateCommand
    | ResourcesCommand
    | CheckpointsCommand
    | LogsCommand
    | ChartCommand
    | BackupCommand
    | ResumeCommand
    | AuditCommand
    | LaunchCommand
    | AutostopCommand
    | QueueCommand
)


class Actor(BaseModel):
    """The person who acts (types the command, clicks the button), and where; travels with every
    job, and is always called `actor`."""

    model_config = ConfigDict(frozen=True)
    user_id: str
    channel_id: str
    text: str = ""
    user_name: str = ""
    response_url: str | None = None
    request_id: str = ""

    @classmethod
    def from_command(cls, body: dict[str, Any]) -> Actor:
        """From a slash command's payload."""
        return cls(
            user_id=body.get("user_id", ""),
            channel_id=body.get("channel_id", ""),
            text=body.get("text", ""),
            user_name=body.get("user_name", ""),
            response_url=body.get("response_url"),
            request_id=body.get("trigger_id", ""),
        )

    @classmethod
    def from_action(cls, body: dict[str, Any]) -> Actor:
        """From a button click's payload (block_actions)."""
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id", "")
        user = body.get("user") or {}
        return cls(
            user_id=user.get("id", ""),
            channel_id=channel,
            user_name=user.get("username", ""),
            response_url=body.get("response_url"),
            request_id=body.get("trigger_id", ""),
        )
