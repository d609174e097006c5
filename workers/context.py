"""What the lower rooms (`slack/`, `state/`) use of a process's services. `Services`
(workers/services.py) is one; it also wires in AWS and the code mirror, so the lower rooms
take this instead and never import the wiring above them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue

    from workers.settings import Settings
    from workers.slack.client import Notifier
    from workers.state.runs import RunStore


def utc_now() -> datetime:
    return datetime.now(UTC)


class Context(Protocol):
    settings: Settings
    redis: Redis
    notifier: Notifier

    @property
    def clock(self) -> Callable[[], datetime]: ...

    @property
    def queue(self) -> Queue: ...

    @property
    def runs(self) -> RunStore: ...
