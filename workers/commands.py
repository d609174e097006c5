"""Parsed commands: what the grammar produces and what jobs receive."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

InstanceId = Annotated[str, Field(pattern=r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$")]


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str


class TrainCommand(Command):
    name: Literal["train"] = "train"
    instance_id: InstanceId
    script: str
    ref: str | None = None
    sync_code: bool = True
    wait: bool = True
    force: bool = False
    checkpoint_interval: int | None = Field(None, ge=1, le=100_000)
    deps: bool = True
    rebuild_env: bool = False
    args: tuple[str, ...] = ()


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
    user: str | None = None


class CheckpointsCommand(Command):
    name: Literal["checkpoints"] = "checkpoints"
    instance_id: InstanceId
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class AuditCommand(Command):
    name: Literal["audit"] = "audit"
    count: int = Field(20, ge=1, le=200)
    instance_id: InstanceId | None = None
    user: str | None = None


AnyCommand = (
    TrainCommand
    | StatusCommand
    | HelpCommand
    | StopCommand
    | StartCommand
    | TerminateCommand
    | ResourcesCommand
    | CheckpointsCommand
    | AuditCommand
)


class Requester(BaseModel):
    """Who asked, and where; travels with every job."""

    model_config = ConfigDict(frozen=True)
    user_id: str
    channel_id: str
    text: str = ""
    user_name: str = ""
    response_url: str | None = None
    request_id: str = ""
