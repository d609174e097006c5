"""Queued runs: the runs that wait for an instance's live run to end (issue 27).

Redis holds the working copy: per instance a sorted set `runctl:rq:i:<instance>` of entry
ids, scored by when each was queued (nanoseconds: a restore from the durable copy keeps the
order); each entry's record `runctl:rq:e:<id>`; `runctl:rq:instances`, the instances with
a queue; and `runctl:rq:starting:<instance>`, the entry whose start job is queued or running
(at most one per instance, with a TTL in case that job's worker dies).

Taking the head (`take_next`) is one WATCH/MULTI transaction over the queue, the starting
marker and the train lock, which also queues the start job: of two workers racing, one
EXEC succeeds, so a queued run is started once and never beside another run.

The durable copy (docs/queue.md) is one signed record per entry in S3, written by the
worker that queues it and deleted once its start job settled or it was cancelled; the
signature is the run records' key (`records.record_key`), so nothing Redis or an
instance holds can forge an entry. This module signs and verifies; the job module
(workers/jobs/queued.py) reads and writes S3.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel, ValidationError
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from workers.commands import Actor, TrainCommand
from workers.state.locks import train_lock
from workers.state.runs import RUN_ID

INSTANCES = "runctl:rq:instances"
LOADED = "runctl:rq:loaded"  # set once the durable copy was read into this Redis
STARTING_TTL_S = 3600 + 300  # the start job's timeout and some: a dead worker's marker lapses
PREFIX = "runctl/queue/"  # the durable copy's S3 prefix
_LABEL = b"queue:"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Entry(BaseModel):
    """One queued run: checked when queued, the ref pinned to its commit."""

    entry_id: str  # also the run id it starts as
    instance_id: str
    actor: Actor  # the requester, as they asked (their channel, their response_url)
    command: TrainCommand  # ref = the pinned commit
    ref_name: str  # the ref as typed (or RUNCTL_REF), for people
    sha: str
    queued_at: datetime
    score: int  # ns since the epoch when it was queued: the queue's order
    behind: str = ""  # the run that was live when it was queued (its thread shows the queue)
    cancel_ts: str = ""  # the message in that thread with its [Cancel], closed when it starts

    @property
    def user_id(self) -> str:
        return self.actor.user_id

    @property
    def nodes(self) -> list[str]:
        """The instances it waits for: a multi-node run's node set is one request, in every
        node's queue at the same score, started only when it heads all of them."""
        return list(self.command.nodes) or [self.instance_id]


def new_entry_id(now: datetime) -> str:
    return f"q{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def queue_key(instance_id: str) -> str:
    return f"runctl:rq:i:{instance_id}"


def entry_key(entry_id: str) -> str:
    return f"runctl:rq:e:{entry_id}"


def starting_key(instance_id: str) -> str:
    return f"runctl:rq:starting:{instance_id}"


def held_key(instance_id: str) -> str:
    return f"runctl:rq:held:{instance_id}"


def user_key(user_id: str) -> str:
    return f"runctl:rq:u:{user_id}"


class QueueFull(Exception):
    """The requester has their limit of queued runs already."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


class QueueStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    # --- reading -----------------------------------------------------------
    def get(self, entry_id: str) -> Entry | None:
        raw = self.redis.get(entry_key(entry_id))
        return Entry.model_validate_json(raw) if raw else None

    def ids(self, instance_id: str) -> list[str]:
        return [_text(i) for i in self.redis.zrange(queue_key(instance_id), 0, -1)]

    def entries(self, instance_id: str) -> list[Entry]:
        ids = self.ids(instance_id)
        raws = self.redis.mget([entry_key(i) for i in ids]) if ids else []
        return [Entry.model_validate_json(r) for r in raws if r]

    def instances(self) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(INSTANCES))

    def starting(self, instance_id: str) -> str | None:
        raw = self.redis.get(starting_key(instance_id))
        return _text(raw) if raw is not None else None

    def length(self, instance_id: str) -> int:
        """Runs waiting in the instance's queue (not the one starting)."""
        return int(self.redis.zcard(queue_key(instance_id)))

    def waiting(self, instance_id: str) -> int:
        """Queued runs for the instance, the one starting counted: a non-empty queue keeps it up."""
        starting = self.starting(instance_id)
        return int(self.redis.zcard(queue_key(instance_id))) + (1 if starting and starting != "pause" else 0)

    def count_of(self, user_id: str) -> int:
        return int(self.redis.scard(user_key(user_id)))

    def of_user(self, user_id: str) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(user_key(user_id)))

    # --- writing -----------------------------------------------------------
    def add(self, entry: Entry, limit: int | None) -> int:
        """Queue `entry`; its 1-based position. QueueFull when its requester has `limit` queued."""
        ukey = user_key(entry.user_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(ukey)  # type: ignore[no-untyped-call]
                    count = int(pipe.scard(ukey))
                    if limit is not None and count >= limit and not pipe.sismember(ukey, entry.entry_id):
                        raise QueueFull(count)
                    pipe.multi()
                    self._put(pipe, entry)
                    for node in entry.nodes:
                        pipe.zrank(queue_key(node), entry.entry_id)
                    ranks = pipe.execute()[-len(entry.nodes) :]
                    return max(int(r) for r in ranks) + 1  # behind the most on its busiest node
                except WatchError:
                    continue

    def restore(self, entry: Entry) -> bool:
        """Put back an entry read from the durable copy, unless Redis knows it already."""
        if not self.redis.set(entry_key(entry.entry_id), entry.model_dump_json(), nx=True):
            return False
        pipe = self.redis.pipeline()
        self._put(pipe, entry)
        pipe.execute()
        return True

    def save(self, entry: Entry) -> None:
        if self.redis.exists(entry_key(entry.entry_id)):
            self.redis.set(entry_key(entry.entry_id), entry.model_dump_json())

    def _put(self, pipe: Pipeline, entry: Entry) -> None:
        pipe.set(entry_key(entry.entry_id), entry.model_dump_json())
        for node in entry.nodes:
            pipe.zadd(queue_key(node), {entry.entry_id: entry.score})
        pipe.sadd(INSTANCES, *entry.nodes)
        pipe.sadd(user_key(entry.user_id), entry.entry_id)

    def remove(self, entry_id: str) -> Entry | None:
        """Take a queued entry out (cancelled, or its instance gone); None when it was not queued
        any more (started, or cancelled by someone else first)."""
        entry = self.get(entry_id)
        if entry is None:
            return None
        removed = self.redis.eval(
            "local n = 0 for i = 3, #KEYS do n = n + redis.call('ZREM', KEYS[i], ARGV[1]) end "
            "if n > 0 then redis.call('DEL', KEYS[1]); redis.call('SREM', KEYS[2], ARGV[1]); return 1 end return 0",
            2 + len(entry.nodes),
            entry_key(entry_id),
            user_key(entry.user_id),
            *[queue_key(node) for node in entry.nodes],
            entry_id,
        )
        return entry if removed else None

    def take_next(self, instance_id: str, queue_job: Callable[[Pipeline, Entry], None]) -> Entry | None:
        """The head of the instance's queue, taken for starting when nothing holds any of its
        instances (no train lock, no start under way, no stop hold) and, for a node set, when it
        heads every node's queue; `queue_job(pipe, entry)` writes its start job in the same
        transaction. None when the queue is empty, an instance busy, or another worker took the
        head first."""
        qkey = queue_key(instance_id)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(qkey)  # type: ignore[no-untyped-call]
                head = pipe.zrange(qkey, 0, 0)
                if not head:
                    return None
                entry_id = _text(head[0])
                raw = pipe.get(entry_key(entry_id))
                if raw is None:  # a record lost by hand: drop the id and let the caller try again
                    pipe.multi()
                    pipe.zrem(qkey, entry_id)
                    pipe.execute()
                    return None
                entry = Entry.model_validate_json(raw)
                nodes = entry.nodes if instance_id in entry.nodes else [instance_id]
                keys = [(queue_key(n), starting_key(n), train_lock(self.redis, n).key, held_key(n)) for n in nodes]
                pipe.watch(*[k for four in keys for k in four])  # type: ignore[no-untyped-call]
                for queue, starting, lock, held in keys:
                    first = pipe.zrange(queue, 0, 0)
                    if not first or _text(first[0]) != entry_id:
                        return None  # another node's queue has others first: their ends start it
                    if pipe.exists(starting) or pipe.exists(lock) or pipe.exists(held):
                        return None
                pipe.multi()
                for queue, starting, _, _ in keys:
                    pipe.zrem(queue, entry_id)
                    pipe.set(starting, entry_id, ex=STARTING_TTL_S)
                queue_job(pipe, entry)
                pipe.execute()
            except WatchError:
                return None  # someone changed a queue, a marker or a lock: they act
        return entry

    def started(self, entry: Entry) -> None:
        """The entry's start job settled (started, refused or failed): forget it and free its instances."""
        pipe = self.redis.pipeline()
        pipe.delete(entry_key(entry.entry_id))
        pipe.srem(user_key(entry.user_id), entry.entry_id)
        pipe.execute()
        self.release(entry.entry_id, entry.nodes)

    def release(self, entry_id: str, instance_ids: list[str]) -> None:
        """Each instance's "starting" marker that still names `entry_id`."""
        self.redis.eval(
            "for i = 1, #KEYS do if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end end "
            "return 0",
            len(instance_ids),
            *[starting_key(iid) for iid in instance_ids],
            entry_id,
        )

    def put_back(self, entry: Entry, pause_s: int = 0) -> None:
        """A start that found an instance busy after all (a `train` got there first): the entry
        goes back at the head; with `pause_s`, nothing starts on its instances for that long."""
        pipe = self.redis.pipeline()
        self._put(pipe, entry)
        pipe.execute()
        self.redis.eval(
            "for i = 1, #KEYS do if redis.call('GET', KEYS[i]) == ARGV[1] then "
            "if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[i], 'pause', 'EX', ARGV[2]) "
            "else redis.call('DEL', KEYS[i]) end end end return 0",
            len(entry.nodes),
            *[starting_key(node) for node in entry.nodes],
            entry.entry_id,
            pause_s,
        )

    def hold(self, instance_id: str, now: float) -> None:
        """A stop powers the instance off: its queue waits for a start (`unhold`)."""
        self.redis.set(held_key(instance_id), str(now))

    def held_since(self, instance_id: str) -> float | None:
        raw = self.redis.get(held_key(instance_id))
        try:
            return float(_text(raw)) if raw is not None else None
        except ValueError:
            return 0.0

    def unhold(self, instance_id: str) -> None:
        self.redis.delete(held_key(instance_id))

    def held(self, instance_id: str) -> bool:
        return bool(self.redis.exists(held_key(instance_id)))

    def forget_instance(self, instance_id: str) -> None:
        if not self.redis.zcard(queue_key(instance_id)) and not self.starting(instance_id):
            self.redis.srem(INSTANCES, instance_id)


# --- the durable copy's records ---------------------------------------------------


class BadRecord(ValueError):
    """A queue record in S3 the bot did not sign, or not for that key."""


def _mac(key: bytes, body: bytes) -> str:
    return "v1=" + hmac.new(key, _LABEL + body, hashlib.sha256).hexdigest()


def record_name(entry: Entry) -> str:
    return f"{PREFIX}{entry.instance_id}/{entry.score:020d}-{entry.entry_id}.json"


def signed_record(key: bytes, entry: Entry) -> bytes:
    body = entry.model_dump_json().encode()
    return json.dumps({"entry": body.decode(), "sig": _mac(key, body)}, ensure_ascii=True).encode()


def verified_record(key: bytes, name: str, data: bytes) -> Entry:
    """The entry in `data`, stored at `name`; BadRecord unless the bot signed exactly it there."""
    try:
        outer = json.loads(data)
        body = str(outer["entry"]).encode()
        sig = str(outer["sig"])
    except (ValueError, KeyError, TypeError):
        raise BadRecord("not a queue record") from None
    if not hmac.compare_digest(sig.encode(), _mac(key, body).encode()):
        raise BadRecord("not signed by runctl")
    try:
        entry = Entry.model_validate_json(body)
    except ValidationError:
        raise BadRecord("not a queued run") from None
    if record_name(entry) != name or not RUN_ID.fullmatch(entry.entry_id):
        raise BadRecord("stored under another name")
    return entry


# --- [Queue after it]: a busy train's command, kept for the click -------------------

OFFER_TTL_S = 1800


class Offer(BaseModel):
    actor: Actor
    command: TrainCommand


def offer(redis: Redis, actor: Actor, command: TrainCommand) -> str:
    nonce = secrets.token_urlsafe(12)
    redis.set(f"runctl:rq:offer:{nonce}", Offer(actor=actor, command=command).model_dump_json(), ex=OFFER_TTL_S)
    return nonce


def take_offer(redis: Redis, nonce: str) -> Offer | None:
    raw = redis.getdel(f"runctl:rq:offer:{nonce}")
    return Offer.model_validate_json(raw) if raw else None


def peek_offer(redis: Redis, nonce: str) -> Offer | None:
    raw = redis.get(f"runctl:rq:offer:{nonce}")
    return Offer.model_validate_json(raw) if raw else None
