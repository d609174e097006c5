"""Owner-checked Redis locks with a TTL.

`runctl:lock:train:<instance>` holds one training per instance; its value names
the run. `runctl:lock:op:<instance>` serialises stop/start/train/terminate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from pydantic import BaseModel
from redis import Redis

from workers.errors import RunConflict

log = logging.getLogger(__name__)

TRAIN_TTL_MS = 15 * 60 * 1000  # renewed by the monitor's heartbeat
OP_TTL_MS = 5 * 60 * 1000

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Holder(BaseModel):
    run_id: str
    user_id: str
    script: str = ""
    since: datetime
    operation: str = "train"

    def token(self) -> str:
        return self.model_dump_json()


class RedisLock:
    def __init__(self, redis: Redis, key: str, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms

    def acquire(self, token: str) -> bool:
        return bool(self.redis.set(self.key, token, nx=True, px=self.ttl_ms))

    def extend(self, token: str) -> bool:
        return bool(self.redis.eval(_EXTEND, 1, self.key, token, self.ttl_ms))

    def release(self, token: str) -> bool:
        return bool(self.redis.eval(_RELEASE, 1, self.key, token))

    def raw(self) -> str | None:
        value = self.redis.get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def holder(self) -> Holder | None:
        raw = self.raw()
        if raw is None:
            return None
        try:
            return Holder.model_validate_json(raw)
        except ValueError:
            return None


def train_lock(redis: Redis, instance_id: str) -> RedisLock:
    return RedisLock(redis, f"runctl:lock:train:{instance_id}", TRAIN_TTL_MS)


def op_lock(redis: Redis, instance_id: str) -> RedisLock:
    return RedisLock(redis, f"runctl:lock:op:{instance_id}", OP_TTL_MS)  # renewed while held


@contextmanager
def operation(redis: Redis, instance_id: str, holder: Holder, wait_seconds: float = 10.0) -> Iterator[None]:
    """Hold the per-instance operation lock; wait briefly, then refuse with who holds it."""
    lock = op_lock(redis, instance_id)
    token = holder.token()
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while not lock.acquire(token):
        if time.monotonic() >= deadline:
            other = lock.holder()
            doing = f"`{other.operation}` by <@{other.user_id}>" if other else "another operation"
            raise RunConflict(
                f"{instance_id} is busy: {doing} is in progress.",
                why="runctl runs one stop/start/train/terminate at a time per instance.",
                fix=f"Try again in a minute, or check `/runctl status {instance_id}`.",
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    done = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, token, done), name=f"op-lock-{instance_id}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        lock.release(token)


def _renew(lock: RedisLock, token: str, done: threading.Event) -> None:
    """Extend the lock every third of its TTL while it is held: a stop may wait up to an
    hour for its training to checkpoint, far past the TTL."""
    while not done.wait(lock.ttl_ms / 3000):
        if not lock.extend(token):
            log.warning("lost %s while holding it", lock.key)
            return


# All or none: a multi-node run holds every node's train lock or none of them, so a race with
# single-node trains (which take one lock with SET NX) never leaves a node set half-held.
_ACQUIRE_ALL = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
end
return 0
"""
_EXTEND_ALL = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    n = n + 1
  end
end
return n
"""
_RELEASE_ALL = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


def acquire_all(redis: Redis, instance_ids: list[str], token: str) -> str | None:
    """Take every instance's train lock in one step (a Lua script runs atomically), or none:
    None when all were taken, else the first instance whose lock someone holds."""
    keys = [train_lock(redis, iid).key for iid in instance_ids]
    busy = int(redis.eval(_ACQUIRE_ALL, len(keys), *keys, token, TRAIN_TTL_MS))
    return None if busy == 0 else instance_ids[busy - 1]


def extend_all(redis: Redis, instance_ids: list[str], token: str) -> int:
    """Renew every lock ``token`` still holds; how many it holds."""
    keys = [train_lock(redis, iid).key for iid in instance_ids]
    return int(redis.eval(_EXTEND_ALL, len(keys), *keys, token, TRAIN_TTL_MS))


def release_all(redis: Redis, instance_ids: list[str], token: str) -> int:
    """Release every lock ``token`` holds; how many it released."""
    keys = [train_lock(redis, iid).key for iid in instance_ids]
    return int(redis.eval(_RELEASE_ALL, len(keys), *keys, token))
