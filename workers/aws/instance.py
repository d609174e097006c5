"""An instance as the fleet describes it, and what a script run on one returned."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from workers.slack.escape import escape

PYTHON_TAG = "runctl:python"  # the instance's training interpreter, over RUNCTL_PYTHON
# StatusDetails of an invocation the agent never received (SSM API reference, GetCommandInvocation).
UNDELIVERED = ("Undeliverable", "DeliveryTimedOut")


@dataclass(frozen=True)
class Instance:
    id: str
    type: str
    state: str
    region: str
    name: str = ""
    launch_time: datetime | None = None
    availability_zone: str = ""
    lifecycle: str = "on-demand"
    tags: Mapping[str, str] = field(default_factory=dict)
    private_ip: str = ""  # DescribeInstances' PrivateIpAddress (a multi-node run's rendezvous address)
    vpc_id: str = ""

    @property
    def label(self) -> str:
        """Name and id as Slack text: the Name tag is untrusted (anyone who may tag the instance
        wrote it), so it is escaped here, where every message takes it from."""
        return f"{escape(self.name)} ({self.id})" if self.name else self.id


# GetCommandInvocation's Status, as the SSM API reference lists it (delivery failures are in StatusDetails).
CommandStatus = Literal[
    "Pending",
    "InProgress",
    "Delayed",
    "Success",
    "Cancelled",
    "TimedOut",
    "Failed",
    "Cancelling",
]


@dataclass(frozen=True)
class ScriptResult:
    instance_id: str
    status: CommandStatus
    exit_code: int
    stdout: str
    stderr: str
    details: str = ""  # StatusDetails: Undeliverable, DeliveryTimedOut, ExecutionTimedOut ...

    @property
    def ok(self) -> bool:
        return self.status == "Success" and self.exit_code == 0

    @property
    def delivered(self) -> bool:
        """False when the agent never received the script, so nothing of it ran."""
        return self.details not in UNDELIVERED
