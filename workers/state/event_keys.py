"""Per-run event keys: issued at launch, read by the web process to verify a run's events.

A key signs the events of one run only (workers/remote/events.py); it is never a Slack
or AWS secret. What it can do if it leaks: move that run's progress bar and make the
worker poll that run once more (an event is a hint; the end is read from the instance),
and only while the run is live: the key is revoked when the run's end is claimed
(workers/jobs/monitor.py), and the web process refuses events of a run that has ended.
"""

from __future__ import annotations

import secrets

from redis import Redis

TTL_SECONDS = 30 * 86400  # renewed by each event acted on for a live run; past it, the run is followed by polling alone


def _key(run_id: str) -> str:
    return f"runctl:events:key:{run_id}"


def issue(redis: Redis, run_id: str) -> str:
    """A fresh random key for run_id (a relaunch of the same run id gets a new one)."""
    key = secrets.token_hex(32)
    redis.set(_key(run_id), key, ex=TTL_SECONDS)
    return key


def get(redis: Redis, run_id: str) -> str | None:
    raw = redis.get(_key(run_id))
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def renew(redis: Redis, run_id: str) -> None:
    redis.expire(_key(run_id), TTL_SECONDS)


def revoke(redis: Redis, run_id: str) -> None:
    """The run ended: its key signs nothing more."""
    redis.delete(_key(run_id))
