"""A worker's teardown ends promptly whatever order rq's UNSUBSCRIBE reply and its stop flag
arrive in. With rq 3.0 and redis-py 8.2, a reply that came first left the command channel's
thread waiting 60 s, and `PubSubWorkerThread.stop()` joined it: the inline worker's burst
hung, and the suite's drains timed out on a fresh machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_mod
from redis.client import PubSub
from rq import Queue

from runctl_sandbox.inline import InlineWorker
from workers.queueing import QUEUE
from workers.services import Services
from workers.worker import RunctlWorker

# Generous beside the one second the fix allows, short beside the 60 s the hang took.
PROMPT = 15.0


@pytest.fixture
def reply_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The channel's thread reads the UNSUBSCRIBE reply before the worker sets the stop flag,
    as it does whenever the main thread is slower than one round trip to Redis."""
    original: Callable[..., Any] = PubSub.unsubscribe  # redis-py leaves it unannotated

    def unsubscribe(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        time.sleep(0.5)
        return result

    monkeypatch.setattr(PubSub, "unsubscribe", unsubscribe)
    yield


def finishes(action: Callable[[], object]) -> bool:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(PROMPT)
    return not thread.is_alive()


def test_the_inline_worker_runs_a_job_and_returns(real_redis: redis_mod.Redis, reply_first: None) -> None:
    job = Queue(QUEUE, connection=real_redis).enqueue("time.time")
    assert finishes(InlineWorker(real_redis).work), "the inline worker's burst did not return"
    job.refresh()  # type: ignore[no-untyped-call]
    assert job.is_finished


def test_the_forking_worker_tears_down_promptly(svc: Services, reply_first: None) -> None:
    worker = RunctlWorker([QUEUE], connection=svc.redis)  # warm: the services are installed
    worker.subscribe()
    assert finishes(worker.unsubscribe), "the worker's teardown waited on its command channel"
    assert worker.pubsub_thread is not None and not worker.pubsub_thread.is_alive()
