"""The daily digest in RUNCTL_CHANNEL: yesterday's and this month's spend per
person and per instance type, what runs and what idles now, the top spenders,
open warnings, and a chart of the last 7 days."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block

from workers import audit, policy
from workers.cost import fleetview
from workers.cost.fleetview import Row
from workers.cost.pricing import cost_of
from workers.jobs import funnel
from workers.queueing import SYSTEM, JobPath, NoArgs, enqueue
from workers.services import Services, current
from workers.slack import chart
from workers.slack.messages.digest import NOBODY, Spend, render
from workers.slack.people import labels
from workers.slack.reach import channel_error, refusal
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger
from workers.state.warnings import WarningStore

log = logging.getLogger(__name__)
CHART_DAYS = 7
RETRY_MINUTES = 30


@funnel.system("digest")
def digest() -> str:
    svc = current()
    now = svc.clock()
    channel = svc.settings.RUNCTL_CHANNEL
    if not channel:
        log.warning("RUNCTL_CHANNEL is not set; no digest")
        return "no channel"
    # The clock may fire twice (a restart, a second clock process): one digest per day. The day
    # is marked done only once the digest is posted, so a refused post is tried again.
    done = f"runctl:digest:{now:%Y-%m-%d}"
    if svc.redis.exists(done):
        return "already posted today"
    claim = f"{done}:posting"
    if not svc.redis.set(claim, "1", nx=True, ex=600):
        return "another digest is being posted"
    try:
        rows = fleetview.view(svc, now)
        text, blocks, png = build(svc, rows, now)
        try:
            ts = svc.notifier.post(channel, text, blocks)
        except SlackApiError as exc:
            return not_posted(svc, channel, exc, now)
        svc.redis.set(done, "1", ex=3 * 86400)
    finally:
        svc.redis.delete(claim)
    if png is not None:
        try:
            svc.notifier.upload(
                channel, f"runctl-spend-{now:%Y%m%d}.png", png, "Spend per person, last 7 days", thread_ts=ts
            )
        except SlackApiError as exc:
            log.warning("digest chart upload failed: %s", exc.response.get("error"))
            error = channel_error(exc)
            if error:  # chat:write.public posted the digest; sharing the chart needs membership
                refused = refusal(svc.settings, channel, error, "share the chart here", "tomorrow's digest has it")
                svc.notifier.post(channel, refused.as_text(), thread_ts=ts)
    return text


def not_posted(svc: Services, channel: str, exc: SlackApiError, now: datetime) -> str:
    """Nothing is lost: the day stays undone and the digest is tried again in RETRY_MINUTES
    (while it is still that day); the admins hear why once, by DM, with the fix."""
    error = str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
    log.warning("digest not posted in %s: %s", channel, error)
    retry_at = now + timedelta(minutes=RETRY_MINUTES)
    if retry_at.date() == now.date():
        enqueue(svc.queue, JobPath.DIGEST, NoArgs(), SYSTEM, delay=timedelta(minutes=RETRY_MINUTES))
    if channel_error(exc) and svc.redis.set(f"runctl:digest:{now:%Y-%m-%d}:told", "1", nx=True, ex=86400):
        then = f"I try again every {RETRY_MINUTES} minutes today"
        text = refusal(svc.settings, channel, error, "post the daily digest there", then).as_text()
        for admin in policy.admin_users(svc.settings):
            try:
                svc.notifier.post(admin, text)  # a user id: the bot's DM with that admin
            except SlackApiError as dm:
                log.warning("could not tell admin %s: %s", admin, dm.response.get("error"))
    return f"not posted: {error}"


def build(svc: Services, rows: list[Row], now: datetime) -> tuple[str, list[Block], bytes | None]:
    today = datetime.combine(now.date(), time(), now.tzinfo)
    days = [today - timedelta(days=n) for n in range(CHART_DAYS, 0, -1)]
    month_start = today.replace(day=1)
    runs = runs_since(svc, min(days[0], month_start), now)
    daily = [spend(svc, rows, runs, day, day + timedelta(days=1), now) for day in days]
    yesterday, month = daily[-1], spend(svc, rows, runs, month_start, now, now)
    open_warnings = WarningStore(svc.redis).open()
    listed = {p for sp in (yesterday, month) for p in sp.person} | {r.live_run.user_id for r in rows if r.live_run}
    listed |= {w.acted_by for w in open_warnings if w.acted_by}
    text, blocks = render(rows, yesterday, month, open_warnings, now, person_labels(svc, listed))
    people = sorted({p for s in daily for p, v in s.person.items() if v})
    names = person_labels(svc, people)
    png = (
        draw(svc, [d.date() for d in days], {p: [s.person.get(p, Decimal(0)) for s in daily] for p in people}, names)
        if people
        else None
    )
    return text, blocks, png


def draw(svc: Services, days: list[date], spend: dict[str, list[Decimal]], names: dict[str, str]) -> bytes | None:
    """The chart, or None when it cannot be drawn: a chart never holds up the digest's text
    (the failure is logged with its traceback and audited)."""
    try:
        return chart.spend_chart(days, spend, names)
    except Exception as exc:
        log.exception("digest chart not drawn; the digest is posted without it")
        entry = audit.Record(
            user=funnel.SYSTEM.user_id,
            text="digest chart",
            decision="failed",
            source="worker",
            outcome=f"chart not drawn ({type(exc).__name__}); the digest was posted without it",
        )
        audit.record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, entry)
        return None


def runs_since(svc: Services, since: datetime, now: datetime) -> dict[str, list[Run]]:
    """Runs that may overlap [since, now], by instance: created since, or still live."""
    # Runs are indexed by creation time; a run created up to 30 days earlier may still overlap.
    oldest = (since - timedelta(days=30)).timestamp()
    ids = {_text(i) for i in svc.redis.zrangebyscore("runctl:runs:all", oldest, "+inf")}
    by_instance: dict[str, list[Run]] = defaultdict(list)
    found = [r for r in (svc.runs.get(i) for i in ids) if r is not None] + svc.runs.live()
    seen: set[str] = set()
    for run in found:
        if run.run_id not in seen and (run.ended_at is None or run.ended_at > since):
            seen.add(run.run_id)
            by_instance[run.instance_id].append(run)
    return by_instance


def spend(
    svc: Services, rows: list[Row], runs: dict[str, list[Run]], start: datetime, end: datetime, now: datetime
) -> Spend:
    """Running cost in [start, end): to whoever ran training then, the rest to the instance's tag owner."""
    ledger = UptimeLedger(svc.redis, svc.clock)
    out = Spend()
    for row in rows:
        rate = row.price.usd_per_hour
        if rate is None:
            continue
        total = ledger.seconds_between(row.id, start, end)
        if total <= 0:
            continue
        attributed = 0.0
        for run in runs.get(row.id, []):
            begin = max(start, run.started_at or run.created_at)
            finish = min(end, run.ended_at or now)
            if finish > begin:
                seconds = ledger.seconds_between(row.id, begin, finish)
                out.person[run.user_id] += _cost(rate, seconds)
                attributed += seconds
        rest = total - attributed
        if rest > 0:
            owner = policy.tag_owner(row.instance.tags) or row.owner or NOBODY
            out.person[owner] += _cost(rate, rest)
        out.type[row.instance.type] += _cost(rate, total)
        out.region[row.instance.region] += _cost(rate, total)
    return out


def person_labels(svc: Services, people: Iterable[str]) -> dict[str, str]:
    """Each person's distinct name (users.info, needs `users:read`); "no owner" for nobody."""
    named = labels(svc, (p for p in people if p != NOBODY))
    named[NOBODY] = "no owner"
    return named


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cost(rate: Decimal, seconds: float) -> Decimal:
    return cost_of(rate, seconds) or Decimal(0)
