"""The services a job needs, built once per process from settings.

The console installs its own (fakeredis, sandbox, fake Slack) with ``install``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from redis import Redis
from rq import Queue

from workers import policy
from workers import settings as settings_mod
from workers.aws.fleet import Fleet
from workers.code.repo import CodeRepo
from workers.context import utc_now
from workers.errors import ConfigError
from workers.queueing import QUEUE, RoutedQueue
from workers.settings import Settings
from workers.slack.client import Notifier, make_client
from workers.state.runs import RunStore


@dataclass
class Services:
    settings: Settings
    redis: Redis
    notifier: Notifier
    clock: Callable[[], datetime] = utc_now
    sleep: Callable[[float], None] = time.sleep
    _fleet: Fleet | None = field(default=None, repr=False)

    @property
    def queue(self) -> Queue:
        return RoutedQueue(QUEUE, connection=self.redis)

    @property
    def runs(self) -> RunStore:
        return RunStore(self.redis)

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            self._fleet = Fleet(
                policy.scope(self.settings),
                self.settings.RUNCTL_S3_BUCKET,
                sleep=self.sleep,
                regions=self.settings.RUNCTL_REGIONS,
            )
        return self._fleet

    @property
    def repo(self) -> CodeRepo:
        if not self.settings.RUNCTL_REPO:
            raise ConfigError("runctl: RUNCTL_REPO is not set")
        return CodeRepo(self.settings.RUNCTL_REPO, self.settings.RUNCTL_MIRROR_DIR)


_installed: Services | None = None


def install(services: Services | None) -> None:
    global _installed
    _installed = services


def from_settings(settings: Settings) -> Services:
    redis: Redis = Redis.from_url(settings.REDIS_URL)
    return Services(settings=settings, redis=redis, notifier=Notifier(make_client(settings)))


def current() -> Services:
    global _installed
    if _installed is None:
        _installed = from_settings(settings_mod.load("worker"))
    return _installed
