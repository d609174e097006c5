"""The periodic sweep (queued by the clock process): fold the fleet into the
uptime ledger, then post, refresh or resolve cost and uptime warnings.

Warnings are posted together, not one message each: chat.postMessage allows about one
message a second per channel and chat.update about 50 a minute for the workspace
(api.slack.com/docs/rate-limits), and a fleet can have hundreds of warnings. A sweep
posts its new warnings in one message per channel (or run thread), PER_POST to a message;
more go into that message's thread, up to MAX_POSTS messages per channel a sweep and within
a per-channel token bucket of one a second; the rest wait for the next sweep. Refreshes go
through the coalescer (workers/slack/updates.py), which updates a post only when what it
shows changed, within the shared chat.update budget, and reschedules on a 429 instead of
sleeping.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from slack_sdk.errors import SlackApiError

from workers.cost import fleetview
from workers.cost.findings import Finding, detect
from workers.errors import RunctlError
from workers.jobs import autostop, funnel
from workers.services import Services, current
from workers.slack import updates
from workers.slack.messages.warning import PER_POST, render_post
from workers.state.warnings import Kind, Status, WarningPost, WarningRecord, WarningStore

log = logging.getLogger(__name__)

MAX_POSTS = 5  # per channel and sweep: within chat.postMessage's short burst
KINDS = list(Kind)


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
    touched: set[tuple[str, str]] = set()  # posts whose warnings changed
    new = sum(warn(svc, store, finding, now, touched) for finding in findings)
    states = {row.id: row.instance.state for row in rows}
    resolved = resolve_cleared(store, {f.key for f in findings}, states, now, touched)
    posted = post_waiting(svc, store, now)
    for channel, ts in sorted(touched):
        updates.show_post(svc, channel, ts)  # sent only if what it shows changed
    stopping = autostop.check(svc, rows, now)
    return (
        f"{len(rows)} instances, {len(findings)} warnings ({new} new, {posted} posted), "
        f"{resolved} resolved, {stopping} autostop"
    )


def warn(svc: Services, store: WarningStore, finding: Finding, now: datetime, touched: set[tuple[str, str]]) -> bool:
    """Refresh an existing warning, or record a new one to post; True when it is new."""
    record = store.get(finding.instance_id, finding.kind)
    if record is not None and not record.window_over(now):
        if record.silenced(now):
            return False
        _absorb(record, finding, now)
        store.save(record)
        if record.ts is not None:
            touched.add((record.channel, record.ts))
        return False
    generation = record.generation + 1 if record else 1
    channel = finding.channel or svc.settings.RUNCTL_CHANNEL
    if not channel:
        log.warning("RUNCTL_CHANNEL is not set; warning %s not posted", finding.key)
        return False
    if not store.claim(finding.instance_id, finding.kind, generation):
        return False  # another sweep recorded this one
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
    store.save(record)
    return True


def resolve_cleared(
    store: WarningStore, active: set[str], states: dict[str, str], now: datetime, touched: set[tuple[str, str]]
) -> int:
    """Close warnings whose condition no longer holds (their buttons go with the post's refresh)."""
    resolved = 0
    for record in store.open():
        if record.key in active:
            continue
        state = states.get(record.instance_id, "gone")
        record.status = Status.RESOLVED
        record.reason = f"the instance is {state}" if state != "running" else "no longer applies"
        record.updated_at = now
        store.save(record)
        if record.ts is not None:
            touched.add((record.channel, record.ts))
        resolved += 1
    return resolved


def post_waiting(svc: Services, store: WarningStore, now: datetime) -> int:
    """Post the open warnings not on Slack yet, grouped by channel and thread; how many were posted."""
    groups: dict[tuple[str, str], list[WarningRecord]] = {}
    for record in store.unposted():
        groups.setdefault((record.channel, record.thread_ts or ""), []).append(record)
    posted = 0
    for channel in sorted({channel for channel, _ in groups}):
        token = uuid.uuid4().hex
        if not store.posting(channel, token):
            continue  # another sweep is posting here; what it leaves, the next sweep posts
        try:
            budget = MAX_POSTS
            for (where, thread), records in sorted(groups.items()):
                if where != channel or budget <= 0:
                    continue
                # Read again under the lock: a sweep that just finished may have posted them.
                waiting = [r for r in (store.get(r.instance_id, r.kind) for r in records) if r and _waiting(r)]
                waiting.sort(key=lambda r: (r.label or r.instance_id, r.instance_id, KINDS.index(r.kind)))
                count, used = _post_group(svc, store, channel, thread or None, waiting, budget, now)
                posted, budget = posted + count, budget - used
        finally:
            store.posted(channel, token)
    return posted


def _waiting(record: WarningRecord) -> bool:
    return record.ts is None and record.status is Status.OPEN


def _post_group(
    svc: Services,
    store: WarningStore,
    channel: str,
    thread_ts: str | None,
    records: list[WarningRecord],
    budget: int,
    now: datetime,
) -> tuple[int, int]:
    """One message, and overflow messages in its thread; (warnings posted, messages used).
    A refusal or a 429 stops posting here: the rest stay waiting for the next sweep."""
    chunks = [records[i : i + PER_POST] for i in range(0, len(records), PER_POST)]
    tokens = 0  # taken first, so the head's note counts only what will go now
    while tokens < min(budget, len(chunks)) and updates.may_post(svc, channel, MAX_POSTS):
        tokens += 1
    shown, left = chunks[:tokens], sum(len(c) for c in chunks[tokens:])
    head: WarningPost | None = None
    posted = 0
    for chunk in shown:
        post = WarningPost(
            channel=channel,
            ts="",
            thread_ts=thread_ts if head is None else (head.thread_ts or head.ts),
            keys=[r.key for r in chunk],
        )
        if head is None:
            post.in_thread = sum(len(c) for c in shown[1:])
            post.later = left
        text, blocks = render_post(post, chunk)
        try:
            post.ts = svc.notifier.post(channel, text, blocks, thread_ts=post.thread_ts, wait=False)
        except SlackApiError as exc:
            log.warning("warnings in %s: Slack said %s; the next sweep posts them", channel, exc.response.get("error"))
            break
        store.save_post(post)
        updates.show_post(svc, channel, post.ts, shown=updates.fingerprint(text, blocks))
        for record in chunk:
            _mark_posted(store, record, post, now)
        posted += len(chunk)
        head = head or post
    if head is not None and (head.in_thread, head.later) != (posted - len(head.keys), len(records) - posted):
        head.in_thread, head.later = posted - len(head.keys), len(records) - posted
        store.save_post(head)
        updates.show_post(svc, channel, head.ts)  # its note said more than got through
    return posted, tokens


def _mark_posted(store: WarningStore, record: WarningRecord, post: WarningPost, now: datetime) -> None:
    fresh = store.get(record.instance_id, record.kind) or record  # a click may have changed it since
    fresh.ts, fresh.posted_at = post.ts, now
    if post.thread_ts is not None:
        fresh.thread_ts = post.thread_ts  # a stop's summary goes into that thread
    store.save(fresh)


def _absorb(record: WarningRecord, finding: Finding, now: datetime) -> None:
    record.owner = finding.owner
    record.label = finding.label
    record.headline = finding.headline
    record.detail = finding.detail
    record.updated_at = now
