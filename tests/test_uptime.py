from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis
import time_machine

from workers.cost.pricing import format_usd
from workers.state.uptime import MAX_INTERVALS, UptimeLedger

pytestmark = pytest.mark.redis

START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
H = timedelta(hours=1)


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=6379, db=15)
    yield client
    for key in client.scan_iter("runctl:uptime:i-test-*"):
        client.delete(key)
    client.close()


@pytest.fixture
def instance() -> str:
    return f"i-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@pytest.fixture
def ledger(redis_client: redis.Redis, clock: time_machine.Traveller) -> UptimeLedger:
    return UptimeLedger(redis_client)


def test_cost_across_stop_and_start_sums_both_running_periods(
    ledger: UptimeLedger, instance: str, clock: time_machine.Traveller
) -> None:
    # First run 08:00-10:00: the sweep sees it a few minutes after launch.
    clock.move_to(START + timedelta(minutes=4))
    ledger.observe(instance, "running", launch_time=START, at=START + timedelta(minutes=4))
    clock.move_to(START + 2 * H)
    ledger.observe(instance, "stopped", launch_time=START, at=START + 2 * H)

    # Started again at 11:00 (LaunchTime resets), seen at 11:03, now 14:00.
    clock.move_to(START + 3 * H + timedelta(minutes=3))
    ledger.observe(instance, "running", launch_time=START + 3 * H, at=clock_now())
    clock.move_to(START + 6 * H)

    assert ledger.running_seconds(instance) == 5 * 3600
    cost = ledger.cost(instance, Decimal("1.006"))
    assert cost == Decimal("5.030")
    assert format_usd(cost) == "$5.03"
    # What LaunchTime alone would have claimed: 3 h, $3.02.
    assert format_usd(Decimal("1.006") * 3) == "$3.02"


def test_double_observe_is_idempotent(ledger: UptimeLedger, instance: str) -> None:
    ledger.observe(instance, "running", START, START + timedelta(minutes=1))
    ledger.observe(instance, "running", START, START + timedelta(minutes=6))
    ledger.observe(instance, "stopped", START, START + H)
    ledger.observe(instance, "stopped", START, START + 2 * H)

    assert ledger.intervals(instance) == [(START, START + H)]


def test_stale_launch_time_does_not_reopen_the_past(ledger: UptimeLedger, instance: str) -> None:
    ledger.mark_running(instance, START)
    ledger.mark_stopped(instance, START + H)
    # A sweep still carrying the old LaunchTime must not back-date the new interval.
    seen = START + 2 * H
    ledger.observe(instance, "running", launch_time=START, at=seen)

    assert ledger.intervals(instance) == [(START, START + H), (seen, None)]
    assert ledger.running_since(instance) == seen


def test_pending_changes_nothing(ledger: UptimeLedger, instance: str) -> None:
    ledger.observe(instance, "pending", None, START)
    assert ledger.intervals(instance) == []
    ledger.mark_running(instance, START)
    ledger.observe(instance, "pending", None, START + H)
    assert ledger.intervals(instance) == [(START, None)]


@pytest.mark.parametrize("state", ["stopping", "stopped", "shutting-down", "terminated"])
def test_non_running_states_close_the_interval(ledger: UptimeLedger, instance: str, state: str) -> None:
    ledger.mark_running(instance, START)
    ledger.observe(instance, state, START, START + H)
    assert ledger.intervals(instance) == [(START, START + H)]
    assert ledger.running_since(instance) is None


def test_terminated_ledger_expires_eventually(ledger: UptimeLedger, instance: str, redis_client: redis.Redis) -> None:
    ledger.mark_running(instance, START)
    ledger.observe(instance, "stopped", START, START + H)
    assert redis_client.ttl(f"runctl:uptime:{instance}") == -1
    ledger.observe(instance, "terminated", START, START + H)
    assert redis_client.ttl(f"runctl:uptime:{instance}") > 80 * 24 * 3600


def test_twenty_threads_open_exactly_one_interval(redis_client: redis.Redis, instance: str) -> None:
    ledger = UptimeLedger(redis_client)
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def start(offset: int) -> None:
        try:
            barrier.wait()
            ledger.mark_running(instance, START + timedelta(seconds=offset))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    intervals = ledger.intervals(instance)
    assert len(intervals) == 1
    assert intervals[0][1] is None


def test_open_interval_counts_up_to_now(ledger: UptimeLedger, instance: str, clock: time_machine.Traveller) -> None:
    ledger.mark_running(instance, START)
    clock.move_to(START + 90 * timedelta(minutes=1))
    assert ledger.running_seconds(instance) == 90 * 60
    assert ledger.running_seconds(instance, now=START + H) == 3600
    assert ledger.running_since(instance) == START


def test_seconds_between_counts_only_the_window(
    ledger: UptimeLedger, instance: str, clock: time_machine.Traveller
) -> None:
    # Ran 08:00-10:00 and from 11:00 on; it is now 14:00.
    ledger.mark_running(instance, START)
    ledger.mark_stopped(instance, START + 2 * H)
    ledger.mark_running(instance, START + 3 * H)
    clock.move_to(START + 6 * H)

    assert ledger.seconds_between(instance, START + H, START + 4 * H) == 2 * 3600
    # The open interval is only counted up to now, not to the end of the window.
    assert ledger.seconds_between(instance, START + 5 * H, START + 8 * H) == 3600
    assert ledger.seconds_between(instance, START - 4 * H, START) == 0
    # "Yesterday" for a daily digest: the whole day.
    day = START.replace(hour=0)
    assert ledger.seconds_between(instance, day, day + 24 * H) == 5 * 3600


def test_unknown_price_means_unknown_cost(ledger: UptimeLedger, instance: str) -> None:
    ledger.mark_running(instance, START)
    assert ledger.cost(instance, None, now=START + H) is None
    assert ledger.cost(instance, Decimal("2"), now=START + H) == Decimal("2")


def test_stop_without_start_and_restart_before_last_end_are_safe(ledger: UptimeLedger, instance: str) -> None:
    ledger.mark_stopped(instance, START)
    assert ledger.intervals(instance) == []
    ledger.mark_running(instance, START)
    ledger.mark_stopped(instance, START + H)
    # A late, out-of-order "running" must not overlap the closed interval.
    ledger.mark_running(instance, START + timedelta(minutes=30))
    assert ledger.intervals(instance) == [(START, START + H), (START + H, None)]


def test_keeps_only_the_latest_intervals(ledger: UptimeLedger, instance: str) -> None:
    for i in range(MAX_INTERVALS + 5):
        ledger.mark_running(instance, START + i * H)
        ledger.mark_stopped(instance, START + i * H + timedelta(minutes=10))

    intervals = ledger.intervals(instance)
    assert len(intervals) == MAX_INTERVALS
    assert intervals[0][0] == START + 5 * H


def test_naive_datetimes_are_refused(ledger: UptimeLedger, instance: str) -> None:
    with pytest.raises(ValueError, match="naive"):
        ledger.mark_running(instance, datetime(2026, 1, 5, 8))


def clock_now() -> datetime:
    return datetime.now(UTC)
