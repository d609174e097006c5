"""The `worker` process: RQ's worker pool, with its workers in two groups.

    python -m workers.pool --url "$REDIS_URL"

RUNCTL_QUICK_WORKERS workers serve only the quick queue (`runctl`: monitor ticks,
status, the reconcile, most commands) and, taking turns with it, run events (`runctl-events`),
so a long job can never hold them; RUNCTL_LONG_WORKERS
serve `runctl-long` first (trains with their environment builds, stops with their grace
waits) and quick jobs when they have none. RQ's WorkerPool respawns a worker that dies;
every worker is rq's forking worker (a work horse per job), started warm, with the
scheduler (one of them holds its lock at a time).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from typing import Any

from redis import Redis
from rq.worker_pool import WorkerPool

from workers import settings as settings_mod
from workers.errors import ConfigError
from workers.queueing import EVENTS_QUEUE, LONG_QUEUE, QUEUE
from workers.worker import RunctlWorker, warm

log = logging.getLogger(__name__)


class RunctlPool(WorkerPool):
    def __init__(self, connection: Redis, quick: int, long: int, **kwargs: Any) -> None:
        self.groups: dict[str, tuple[list[str], int]] = {
            "quick": ([QUEUE, EVENTS_QUEUE], quick),
            "long": ([LONG_QUEUE, QUEUE], long),
        }
        self.group_of: dict[str, str] = {}
        super().__init__(
            [QUEUE, LONG_QUEUE, EVENTS_QUEUE], connection, num_workers=quick + long, worker_class=RunctlWorker, **kwargs
        )

    def start_worker(
        self, count: int | None = None, burst: bool = True, _sleep: float = 0, logging_level: str = "INFO"
    ) -> None:
        """Start a worker of the group that is short of one (WorkerPool respawns by count)."""
        counts = Counter(self.group_of.get(name) for name in self.worker_dict)
        group = next((g for g, (_, n) in self.groups.items() if counts[g] < n), "quick")
        self._queue_names = self.groups[group][0]  # what get_worker_process hands the worker
        before = set(self.worker_dict)
        super().start_worker(count, burst=burst, _sleep=_sleep, logging_level=logging_level)
        for name in set(self.worker_dict) - before:
            self.group_of[name] = group
            log.info("worker %s serves %s", name, " then ".join(self._queue_names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.pool", description=__doc__)
    parser.add_argument("--url", required=True, help="Redis URL")
    args = parser.parse_args(argv)
    try:
        settings = settings_mod.load("worker")
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        return 2
    warm()  # once here: every worker forked from this process starts with the modules loaded
    pool = RunctlPool(Redis.from_url(args.url), settings.RUNCTL_QUICK_WORKERS, settings.RUNCTL_LONG_WORKERS)
    pool.start(burst=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
