"""Accumulated running time per EC2 instance, kept as intervals in Redis.

EC2's ``LaunchTime`` resets at every start, so it cannot say how long an instance
has run in total. The ledger records each running interval instead: one Redis
list per instance (``runctl:uptime:<instance-id>``), each element
``"<start_us>:<end_us>"`` in epoch microseconds, the end left empty while the
interval is open. Every change is a Lua script, so concurrent sweeps and bot
actions cannot open two intervals or close one twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, NamedTuple

from workers.context import utc_now
from workers.cost.pricing import cost_of

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

KEY_PREFIX = "runctl:uptime:"
MAX_INTERVALS = 500
# Terminated instances never run again; their ledger is kept long enough for
# monthly cost reports and then left to expire.
TERMINATED_RETENTION = timedelta(days=90)
STOPPED_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})

Interval = tuple[datetime, datetime | None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# Opens an interval unless one is open. ARGV[1] is the preferred start (LaunchTime),
# used only when later than the end of the last closed interval; ARGV[2] is the
# fallback (when we saw it running). Never starts before the last interval ended
# nor after the fallback.
_OPEN = """
local preferred = tonumber(ARGV[1])
local fallback = tonumber(ARGV[2])
local start = math.min(preferred, fallback)
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
    local sep = string.find(last, ':', 1, true)
    local last_end = string.sub(last, sep + 1)
    if last_end == '' then
        return 0
    end
    last_end = tonumber(last_end)
    if preferred <= last_end then
        start = fallback
    end
    start = math.max(start, last_end)
end
redis.call('RPUSH', KEYS[1], string.format('%d:', start))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
return 1
"""

# Closes the open interval, if any, at ARGV[1] (never before it started).
_CLOSE = """
local last = redis.call('LINDEX', KEYS[1], -1)
if not last then
    return 0
end
local sep = string.find(last, ':', 1, true)
if string.sub(last, sep + 1) ~= '' then
    return 0
end
local start = tonumber(string.sub(last, 1, sep - 1))
local stop = math.max(tonumber(ARGV[1]), start)
redis.call('LSET', KEYS[1], -1, string.format('%d:%d', start, stop))
return 1
"""


class Sighting(NamedTuple):
    """One instance as a fleet describe reported it."""

    instance_id: str
    state: str
    launch_time: datetime | None


@dataclass(frozen=True)
class Uptime:
    """One instance's intervals as read in one go; every figure the fleet view needs."""

    intervals_us: tuple[tuple[int, int | None], ...]

    @property
    def running_since(self) -> datetime | None:
        """Start of the open interval, or None when the instance is not running."""
        if self.intervals_us and self.intervals_us[-1][1] is None:
            return _from_us(self.intervals_us[-1][0])
        return None

    def running_seconds(self, now: datetime) -> float:
        """Total running time; an open interval counts up to ``now``."""
        return self.running_us(now) / 1_000_000

    def cost(self, price: Decimal | None, now: datetime) -> Decimal | None:
        """Accumulated cost at ``price`` USD/hour; None when the price is unknown."""
        return cost_of(price, Decimal(self.running_us(now)) / 1_000_000)

    def running_us(self, now: datetime) -> int:
        now_us = _to_us(now)
        return sum(max(0, (now_us if end is None else end) - start) for start, end in self.intervals_us)


class UptimeLedger:
    def __init__(self, redis: Redis, clock: Callable[[], datetime] = utc_now) -> None:
        self._redis = redis
        self._clock = clock
        self._open = redis.register_script(_OPEN)
        self._close = redis.register_script(_CLOSE)

    def mark_running(self, instance_id: str, at: datetime) -> None:
        """Open an interval at ``at`` unless one is already open."""
        self._open_interval(instance_id, preferred=at, fallback=at)

    def mark_stopped(self, instance_id: str, at: datetime) -> None:
        """Close the open interval at ``at``; a no-op when none is open."""
        self._close(keys=[_key(instance_id)], args=[_to_us(at)])

    def observe(self, instance_id: str, state: str, launch_time: datetime | None, at: datetime) -> None:
        """Fold one fleet-sweep sighting of an instance into the ledger.

        A running instance with no open interval is taken to have started at its
        ``LaunchTime`` when that is newer than what we last recorded, else at
        ``at``; a stopping/stopped/terminated one has its interval closed at
        ``at``, the best we know. ``pending`` (and anything unknown) changes nothing.
        """
        self._observe(self._redis, Sighting(instance_id, state, launch_time), at)

    def observe_many(self, sightings: Iterable[Sighting], at: datetime) -> None:
        """``observe`` for many instances in one round trip (one pipeline).

        The pipeline is not a transaction: each open/close is still its own Lua
        script, atomic per instance, which is all ``observe`` promises.
        """
        pipe = self._redis.pipeline(transaction=False)
        for sighting in sightings:
            self._observe(pipe, sighting, at)
        if len(pipe):
            pipe.execute()

    def read(self, instance_id: str) -> Uptime:
        return Uptime(tuple(self._intervals_us(instance_id)))

    def read_many(self, instance_ids: Iterable[str]) -> dict[str, Uptime]:
        """Every instance's intervals in one round trip (one pipeline of LRANGE)."""
        ids = list(instance_ids)
        pipe: Pipeline = self._redis.pipeline(transaction=False)
        for instance_id in ids:
            pipe.lrange(_key(instance_id), 0, -1)
        replies = pipe.execute() if ids else []
        return {
            instance_id: Uptime(tuple(_split(_text(item)) for item in reply))
            for instance_id, reply in zip(ids, replies, strict=True)
        }

    def intervals(self, instance_id: str) -> list[Interval]:
        return [_parse(raw) for raw in self._raw(instance_id)]

    def running_since(self, instance_id: str) -> datetime | None:
        """Start of the open interval, or None when the instance is not running."""
        return self.read(instance_id).running_since

    def running_seconds(self, instance_id: str, now: datetime | None = None) -> float:
        """Total running time; an open interval counts up to ``now``."""
        return self.read(instance_id).running_seconds(now or self._clock())

    def seconds_between(self, instance_id: str, start: datetime, end: datetime) -> float:
        """Running time that falls inside the window [start, end)."""
        window_start, window_end = _to_us(start), _to_us(end)
        now = _to_us(self._clock())
        total = 0
        for interval_start, interval_end in self._intervals_us(instance_id):
            stop = now if interval_end is None else interval_end
            total += max(0, min(stop, window_end) - max(interval_start, window_start))
        return total / 1_000_000

    def cost(self, instance_id: str, price: Decimal | None, now: datetime | None = None) -> Decimal | None:
        """Accumulated cost at ``price`` USD/hour; None when the price is unknown."""
        if price is None:
            return None
        return self.read(instance_id).cost(price, now or self._clock())

    def _observe(self, client: Redis | Pipeline, sighting: Sighting, at: datetime) -> None:
        instance_id, state, launch_time = sighting
        if state == "running":
            self._open_interval(instance_id, preferred=launch_time or at, fallback=at, client=client)
        elif state in STOPPED_STATES:
            self._close(keys=[_key(instance_id)], args=[_to_us(at)], client=client)
            if state == "terminated":
                client.expire(_key(instance_id), TERMINATED_RETENTION)

    def _open_interval(
        self, instance_id: str, preferred: datetime, fallback: datetime, client: Redis | Pipeline | None = None
    ) -> None:
        self._open(
            keys=[_key(instance_id)],
            args=[_to_us(preferred), _to_us(fallback), MAX_INTERVALS],
            client=client,
        )

    def _intervals_us(self, instance_id: str) -> list[tuple[int, int | None]]:
        return [_split(raw) for raw in self._raw(instance_id)]

    def _raw(self, instance_id: str) -> list[str]:
        reply = self._redis.lrange(_key(instance_id), 0, -1)
        if not isinstance(reply, list):
            raise TypeError(f"unexpected Redis reply {reply!r}")
        return [_text(item) for item in reply]


def _text(item: object) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


def _key(instance_id: str) -> str:
    return f"{KEY_PREFIX}{instance_id}"


def _to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the ledger needs timezone-aware UTC")
    return (moment - _EPOCH) // _MICROSECOND


def _from_us(microseconds: int) -> datetime:
    return _EPOCH + timedelta(microseconds=microseconds)


def _split(raw: str) -> tuple[int, int | None]:
    start, _, end = raw.partition(":")
    return int(start), int(end) if end else None


def _parse(raw: str) -> Interval:
    start, end = _split(raw)
    return _from_us(start), None if end is None else _from_us(end)
