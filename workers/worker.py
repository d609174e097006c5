"""The `worker` process: rq's forking worker, started warm.

rq forks a work horse per job. Loading the job modules and botocore's service
models in the parent, once, means each fork starts in milliseconds instead of
re-importing (about 1.5 s for the EC2 client alone)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from botocore.exceptions import BotoCoreError
from rq import Queue, Worker

from workers import services
from workers.errors import ConfigError
from workers.queueing import JobPath, take_turns


def warm() -> None:
    for module in {path.module for path in JobPath}:
        importlib.import_module(module)
    try:
        svc = services.current()
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        raise SystemExit(2) from None
    try:
        _ = svc.fleet  # builds the boto3 clients; nothing connects before the fork
    except BotoCoreError as exc:
        print(f"runctl: the worker cannot set up AWS clients: {exc} (set AWS_DEFAULT_REGION / AWS_*)", file=sys.stderr)
        raise SystemExit(2) from None


class RunctlWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        warm()

    def reorder_queues(self, reference_queue: Queue) -> None:
        self._ordered_queues = take_turns(self._ordered_queues, reference_queue)

    def subscribe(self) -> None:
        """rq's command channel (shutdown, stop-job), its thread waking every second.

        rq 3 lets the thread wait 60 s and relies on its UNSUBSCRIBE reply to wake it; when the
        reply comes before the stop flag, the thread waits again, and redis-py 8.2's
        `PubSubWorkerThread.stop()` joins it: teardown could hang a minute. One second bounds it.
        """
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )
