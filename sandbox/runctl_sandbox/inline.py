"""Run queued jobs in this process: the console demo and the tests use it in
place of `rq worker --with-scheduler`."""

from __future__ import annotations

import threading
import time
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from rq.timeouts import TimerDeathPenalty

from workers.queueing import QUEUES, take_turns


class _ThreadSafeWorker(SimpleWorker):
    death_penalty_class = TimerDeathPenalty  # SIGALRM only works in the main thread

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()  # type: ignore[no-untyped-call]

    def reorder_queues(self, reference_queue: Queue) -> None:
        self._ordered_queues = take_turns(self._ordered_queues, reference_queue)  # as workers/worker.py

    def subscribe(self) -> None:
        # No command channel: nothing sends commands to an in-process worker, and rq 3's teardown
        # with redis-py 8.2 could wait up to 60 s for the channel's thread (workers/worker.py).
        pass


class InlineWorker:
    def __init__(self, redis: Redis, queue_names: tuple[str, ...] = QUEUES) -> None:
        self.redis = redis
        self.queues = [Queue(name, connection=redis) for name in queue_names]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: _ThreadSafeWorker | None = None
        self.busy = threading.Event()

    def promote(self, everything: bool = False) -> int:
        """Move scheduled jobs that are due (or all of them) onto their queue."""
        moved = 0
        for queue in self.queues:
            registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
            ids = registry.get_job_ids() if everything else registry.get_jobs_to_schedule(int(time.time()))
            for job_id in ids:
                job = queue.fetch_job(job_id)
                registry.remove(job_id)
                if job is not None:
                    queue._enqueue_job(job)
                    moved += 1
        return moved

    def pending(self) -> int:
        return sum(int(q.count) for q in self.queues)

    def scheduled(self) -> int:
        total = 0
        for queue in self.queues:
            registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
            total += int(registry.count)
        return total

    def work(self) -> bool:
        """Run every queued job once; True if any ran."""
        if not self.pending():
            return False
        self.busy.set()
        try:
            worker = self._worker = _ThreadSafeWorker(self.queues, connection=self.redis)
            worker.work(burst=True, logging_level="WARNING")
        finally:
            self._worker = None
            self.busy.clear()
        return True

    def drain(self, timeout: float = 60.0, everything: bool = True) -> None:
        """Run jobs, including scheduled ones, until nothing is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.promote(everything)
            if not self.work() and not self.scheduled():
                return
        raise TimeoutError("jobs still pending after drain timeout")

    def start(self, interval: float = 0.2) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.promote()
                if not self.work():
                    self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="inline-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The thread takes no job after the one it runs (a test's jobs never run into the next
        test); `work` and `drain` still run jobs when called."""
        self._stop.set()
        if (worker := self._worker) is not None:
            worker._stop_requested = True  # what rq's SIGTERM handler sets: stop after the current job
        if self._thread:
            self._thread.join(timeout=30)

    def idle(self) -> bool:
        return not self.busy.is_set() and not self.pending()

    def __enter__(self) -> InlineWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
