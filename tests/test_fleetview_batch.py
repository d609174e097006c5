"""The fleet view reads and writes Redis a page at a time: the number of round
trips grows with pages, not instances, and the batched figures are exactly what
the per-instance ledger and run store say."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis

from workers.cost import fleetview
from workers.services import Services
from workers.state.runs import Run, RunState
from workers.state.uptime import Sighting, UptimeLedger
from workers.state.warnings import OPEN_SET, Kind, WarningRecord, WarningStore

from .fleetgen import generate

pytestmark = pytest.mark.redis

NOW = datetime.fromisoformat("2026-03-10T12:00:00+00:00")
H = timedelta(hours=1)


class RoundTrips:
    """Counts what a client sends to Redis: one command, or one whole pipeline."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        pool = client.connection_pool
        checkout = pool.get_connection

        def counted_checkout(*args: Any, **kwargs: Any) -> Any:
            conn = checkout(*args, **kwargs)
            if not getattr(conn, "_counted", False):
                send: Any = conn.send_packed_command

                def counted_send(*a: Any, **k: Any) -> None:
                    self.count += 1
                    send(*a, **k)

                monkeypatch.setattr(conn, "send_packed_command", counted_send)
                monkeypatch.setattr(conn, "_counted", True, raising=False)
            return conn

        monkeypatch.setattr(pool, "get_connection", counted_checkout)


@pytest.fixture
def trips(svc: Services, monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    return RoundTrips(svc.redis, monkeypatch)


def run(iid: str, user: str, state: RunState, n: int = 1) -> Run:
    return Run(
        run_id=f"r-{iid[-6:]}-{n}",
        instance_id=iid,
        user_id=user,
        channel_id="C0TRAIN",
        script="train.py",
        state=state,
        created_at=NOW - 3 * H + n * timedelta(minutes=1),
        started_at=NOW - 3 * H,
        ended_at=NOW - H if state.ended else None,
    )


def test_round_trips_grow_with_pages_not_instances(svc: Services, trips: RoundTrips) -> None:
    fleet = generate(2_500, NOW)  # three describe pages
    spot = [replace(inst, id=f"i-spot{i:012x}", lifecycle="spot") for i, inst in enumerate(fleet[:200])]
    svc.redis.set("runctl:price:spot:us-east-1a:g5.xlarge", "0.4")
    svc.redis.set("runctl:price:spot:us-east-1a:p3.2xlarge", "0.9")
    for kind in ("t3.medium", "m5.large", "x9.mystery"):
        svc.redis.set(f"runctl:price:spot:us-east-1a:{kind}", "none")
    on_demand = {(inst.region, inst.type) for inst in fleet}
    for region, kind in on_demand:  # the Price List API's answers, cached for the day
        svc.redis.set(f"runctl:price:on-demand:{region}:{kind}", "none")
    for inst in fleet[:300]:
        svc.runs.create(run(inst.id, "U0BOB", RunState.SUCCEEDED))
    live = run(fleet[1].id, "U0ALICE", RunState.RUNNING, n=2)
    svc.runs.save(svc.runs.create(live))

    trips.count = 0
    rows = fleetview.collect(svc, fleet + spot, NOW)

    assert len(rows) == 2_700
    # Per page: the ledger's scripts (+ their SCRIPT EXISTS), its reads, latest runs (LINDEX
    # pipeline + MGET); plus the live runs once and one GET per distinct spot or on-demand market.
    # Per instance this was 5 round trips, 13,500 here.
    assert trips.count <= 5 * 3 + 2 + 5 + len(on_demand)
    assert rows[1].live_run == live
    assert rows[2_500].price.usd_per_hour == Decimal("0.4")


def test_batched_rows_match_the_per_instance_ledger_and_run_store(svc: Services) -> None:
    fleet = generate(40, NOW)
    fleet[3] = replace(fleet[3], state="terminated")
    fleet[4] = replace(fleet[4], state="pending")
    ledger = UptimeLedger(svc.redis, lambda: NOW)
    for inst in fleet[:10]:
        # An earlier, closed interval that LaunchTime alone would not know about.
        ledger.mark_running(inst.id, NOW - 30 * H)
        ledger.mark_stopped(inst.id, NOW - 28 * H)
    svc.runs.create(run(fleet[0].id, "U0BOB", RunState.SUCCEEDED))  # ended: idle since it ended
    svc.runs.create(run(fleet[2].id, "U0BOB", RunState.QUEUED))  # queued: not idle
    svc.runs.create(run(fleet[5].id, "U0BOB", RunState.FAILED))
    svc.runs.create(run(fleet[5].id, "U0CAROL", RunState.SUCCEEDED, n=2))  # the latest wins

    rows = fleetview.collect(svc, fleet, NOW)

    for row in rows:
        assert row.uptime_seconds == ledger.running_seconds(row.id, NOW), row.id
        assert row.cost == ledger.cost(row.id, row.price.usd_per_hour, NOW), row.id
        assert row.last_run == svc.runs.latest(row.id), row.id
    by_id = {row.id: row for row in rows}
    assert by_id[fleet[0].id].uptime_seconds == (2 + 1) * 3600  # 2 h before, 1 h since launch
    assert by_id[fleet[0].id].idle_since == NOW - H
    assert by_id[fleet[1].id].idle_since == NOW - 2 * H  # running, never trained: since it started
    assert by_id[fleet[2].id].idle_since is None
    assert by_id[fleet[5].id].owner == "U0CAROL"
    assert by_id[fleet[7].id].owner == fleet[7].tags["runctl:user"]
    assert ledger.running_since(fleet[3].id) is None  # terminated: closed
    assert svc.redis.ttl(f"runctl:uptime:{fleet[3].id}") > 80 * 24 * 3600
    assert ledger.intervals(fleet[4].id) == [(NOW - 30 * H, NOW - 28 * H)]  # pending: untouched


def test_observe_many_records_what_observe_records(real_redis: redis.Redis) -> None:
    ledger = UptimeLedger(real_redis, lambda: NOW)
    steps = [
        ("running", NOW - 5 * H, NOW - 5 * H + timedelta(minutes=3)),
        ("running", NOW - 5 * H, NOW - 4 * H),
        ("stopped", NOW - 5 * H, NOW - 3 * H),
        ("pending", None, NOW - 2 * H),
        ("running", NOW - 2 * H, NOW - H),
        ("terminated", NOW - 2 * H, NOW),
    ]
    for state, launch, at in steps:
        ledger.observe("i-one-by-one", state, launch, at)
        ledger.observe_many([Sighting("i-batched", state, launch)], at)

    expected = [(NOW - 5 * H, NOW - 3 * H), (NOW - 2 * H, NOW)]
    assert ledger.intervals("i-one-by-one") == expected
    assert ledger.intervals("i-batched") == expected
    assert real_redis.ttl("runctl:uptime:i-batched") > 80 * 24 * 3600
    assert ledger.read_many(["i-batched", "i-never-seen"])["i-never-seen"].running_seconds(NOW) == 0


def test_concurrent_batched_sweeps_open_one_interval_per_instance(real_redis: redis.Redis) -> None:
    ledger = UptimeLedger(real_redis)
    ids = [f"i-race-{i:04d}" for i in range(300)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def sweep(offset: int) -> None:
        try:
            barrier.wait()
            ledger.observe_many((Sighting(i, "running", None) for i in ids), NOW + timedelta(seconds=offset))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    found = ledger.read_many(ids)
    assert all(len(found[i].intervals_us) == 1 and found[i].running_since is not None for i in ids)


def test_open_warnings_are_read_in_one_go_and_stale_entries_dropped(svc: Services, trips: RoundTrips) -> None:
    store = WarningStore(svc.redis)
    for i in range(200):
        store.save(
            WarningRecord(
                instance_id=f"i-w{i:04d}",
                kind=Kind.UPTIME,
                generation=1,
                channel="C0OPS",
                posted_at=NOW,
                updated_at=NOW,
            )
        )
    svc.redis.sadd(OPEN_SET, "i-gone:cost")  # its record expired

    trips.count = 0
    found = store.open()
    sent = trips.count

    assert sent <= 3  # SMEMBERS, MGET, SREM: not one GET per warning
    assert [r.instance_id for r in found] == [f"i-w{i:04d}" for i in range(200)]
    assert not svc.redis.sismember(OPEN_SET, "i-gone:cost")
