"""The clock process's schedule, for rq's cron scheduler:

    TZ=UTC rq cron workers/cron.py --url "$REDIS_URL"

The sweep runs every RUNCTL_SWEEP_MINUTES, the reconcile every RUNCTL_RECONCILE_SECONDS,
the digest on RUNCTL_DIGEST_CRON, and a monitor tick every poll interval (at most a
minute): a tick scheduled by a worker that died, or lost with Redis' keys, is replaced
within that (a tick with nothing due costs two Redis calls).
"""

from __future__ import annotations

import os
import time

from rq import cron

from workers import settings as settings_mod
from workers.jobs.digest import digest
from workers.jobs.monitor import tick
from workers.jobs.reconcile import reconcile
from workers.jobs.sweep import sweep
from workers.queueing import QUEUE

# rq matches cron fields against local time; RUNCTL_DIGEST_CRON is documented as UTC.
os.environ["TZ"] = "UTC"
time.tzset()

_settings = settings_mod.load("clock")
SWEEP_SECONDS = _settings.RUNCTL_SWEEP_MINUTES * 60

# A sweep that has not started within one interval is stale: the next one replaces it.
cron.register(sweep, QUEUE, interval=SWEEP_SECONDS, ttl=SWEEP_SECONDS, job_timeout=SWEEP_SECONDS, name="sweep")
RECONCILE_SECONDS = _settings.RUNCTL_RECONCILE_SECONDS
cron.register(reconcile, QUEUE, interval=RECONCILE_SECONDS, ttl=RECONCILE_SECONDS, job_timeout=300, name="reconcile")
TICK_SECONDS = int(min(60.0, max(1.0, _settings.RUNCTL_POLL_MAX_SECONDS)))
cron.register(tick, QUEUE, args=("clock",), interval=TICK_SECONDS, ttl=TICK_SECONDS, job_timeout=900, name="monitor")
cron.register(digest, QUEUE, cron=_settings.RUNCTL_DIGEST_CRON, job_timeout=600, name="digest")
