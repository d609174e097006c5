"""The periodic sweep (queued by the clock process): fold the fleet into the
uptime ledger, then post, refresh or resolve cost and uptime warnings."""

from __future__ import annotations

import logging
from datetime import datetime

from slack_sdk.errors import SlackApiError

from workers.cost import fleetview
from workers.cost.findings import Finding, detect
from workers.errors import RunctlError
from workers.jobs import autostop, funnel
from workers.services import Services, current
from workers.slack.messages.warning import render
from workers.state.warnings import Status, WarningRecord, WarningStore

log = logging.getLogger(__name__)


@funnel.system("sweep")
def sweep() -> str:
    svc = current()
    now = svc.clock()
    try:
        rows = fleetview.view(svc, now)
    except RunctlError as exc:
        # The next sweep retries; resolving warnings on a failed describe would be wrong.
        log.warning("sweep: %s %s", exc.what, exc.why)
        return exc.what
    findings = detect(svc.settings, rows, now)
    store = WarningStore(svc.redis)
    posted = sum(warn(svc, store, finding, now) for finding in findings)
    states = {row.id: row.instance.state for row in rows}
    resolved = resolve_cleared(svc, store, {f.key for f in findings}, states, now)
    stopping = autostop.check(svc, rows, now)
    return f"{len(rows)} instances, {len(findings)} warnings ({posted} new), {resolved} resolved, {stopping} autostop"


def warn(svc: Services, store: WarningStore, finding: Finding, now: datetime) -> bool:
    """Post a new warning or refresh the existing message; True when one was posted."""
    record = store.get(finding.instance_id, finding.kind)
    if record is not None and not record.window_over(now):
        if record.silenced(now):
            return False
        _absorb(record, finding, now)
        store.save(record)
        return _publish(svc, store, record)
    generation = record.generation + 1 if record else 1
    if not store.claim(finding.instance_id, finding.kind, generation):
        return False  # another sweep is posting this one
    channel = finding.channel or svc.settings.RUNCTL_CHANNEL
    if not channel:
        log.warning("RUNCTL_CHANNEL is not set; warning %s not posted", finding.key)
        return False
    record = WarningRecord(
        instance_id=finding.instance_id,
        kind=finding.kind,
        generation=generation,
        channel=channel,
        thread_ts=finding.thread_ts,
        run_id=finding.run_id,
        posted_at=now,
        updated_at=now,
    )
    _absorb(record, finding, now)
    return _publish(svc, store, record)


def resolve_cleared(
    svc: Services, store: WarningStore, active: set[str], states: dict[str, str], now: datetime
) -> int:
    """Close warnings whose condition no longer holds, and drop their buttons."""
    resolved = 0
    for record in store.open():
        if record.key in active:
            continue
        state = states.get(record.instance_id, "gone")
        record.status = Status.RESOLVED
        record.reason = f"the instance is {state}" if state != "running" else "no longer applies"
        record.updated_at = now
        store.save(record)
        _publish(svc, store, record)
        resolved += 1
    return resolved


def _absorb(record: WarningRecord, finding: Finding, now: datetime) -> None:
    record.owner = finding.owner
    record.label = finding.label
    record.headline = finding.headline
    record.detail = finding.detail
    record.updated_at = now


def _publish(svc: Services, store: WarningStore, record: WarningRecord) -> bool:
    """Post the message the first time, update it afterwards; True when posted."""
    text, blocks = render(record)
    try:
        if record.ts is None:
            record.ts = svc.notifier.post(record.channel, text, blocks, thread_ts=record.thread_ts)
            store.save(record)
            return True
        svc.notifier.update(record.channel, record.ts, text, blocks)
    except SlackApiError as exc:
        log.warning("warning %s: Slack said %s", record.key, exc.response.get("error"))
        store.save(record)
    return False
