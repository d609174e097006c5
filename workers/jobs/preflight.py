"""The one preflight before a script runs on an instance: its state (this module), then its
SSM agent (`Fleet.require_agent`). Each job says in its own words what it cannot do."""

from __future__ import annotations

from dataclasses import dataclass

from workers.aws.instance import Instance
from workers.errors import WrongState


@dataclass(frozen=True)
class Refusals:
    """What a job says when the instance is not running; `stopped` and `gone` follow
    "<label> is <state>"."""

    stopped: str
    stopped_why: str
    stopped_fix: str
    gone: str
    gone_fix: str = ""
    pending_why: str = ""
    pending_fix: str = ""


def require_running(inst: Instance, say: Refusals, wait_pending: bool = False) -> None:
    """WrongState unless `inst` is running (or, with `wait_pending`, pending: the caller waits)."""
    if inst.state in ("stopped", "stopping"):
        raise WrongState(
            f"{inst.label} is {inst.state}{say.stopped}", state=inst.state, why=say.stopped_why, fix=say.stopped_fix
        )
    if inst.state in ("terminated", "shutting-down"):
        raise WrongState(f"{inst.label} is {inst.state}{say.gone}", state=inst.state, fix=say.gone_fix)
    if inst.state == "pending" and not wait_pending:
        raise WrongState(f"{inst.label} is still starting.", state=inst.state, why=say.pending_why, fix=say.pending_fix)
