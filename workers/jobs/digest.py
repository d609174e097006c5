"""The daily digest in RUNCTL_CHANNEL: yesterday's and this month's spend per
person and per instance type, what runs and what idles now, the top spenders,
open warnings, and a chart of the last 7 days."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers import audit, policy
from workers.cost import fleetview
from workers.cost.fleetview import Row
from workers.cost.pricing import cost_of, format_usd
from workers.jobs import funnel
from workers.queueing import SYSTEM, JobPath, NoArgs, enqueue
from workers.services import Services, current
from workers.slack import chart
from workers.slack.blocks import sections
from workers.slack.client import clamp
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.slack.messages import Message
from workers.slack.people import labels
from workers.slack.reach import channel_error, refusal
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger
from workers.state.warnings import WarningRecord, WarningStore

log = logging.getLogger(__name__)
LIST_LIMIT = 10
CHART_DAYS = 7
RETRY_MINUTES = 30
NOBODY = "nobody"  # running time with no run and no runctl:user tag


@dataclass
class Spend:
    """USD per person, per instance type and per region over one window."""

    person: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    type: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    region: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))

    @property
    def total(self) -> Decimal:
        return sum(self.type.values(), Decimal(0))


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
            svc.notifier.upload(channel, f"runctl-spend-{now:%Y%m%d}.png", png, "Spend per person, last 7 days",
                                thread_ts=ts)
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
    png = draw(
        svc, [d.date() for d in days], {p: [s.person.get(p, Decimal(0)) for s in daily] for p in people}, names
    ) if people else None
    return text, blocks, png


def draw(svc: Services, days: list[date], spend: dict[str, list[Decimal]], names: dict[str, str]) -> bytes | None:
    """The chart, or None when it cannot be drawn: a chart never holds up the digest's text
    (the failure is logged with its traceback and audited)."""
    try:
        return chart.spend_chart(days, spend, names)
    except Exception as exc:
        log.exception("digest chart not drawn; the digest is posted without it")
        entry = audit.Record(user=funnel.SYSTEM.user_id, text="digest chart", decision="failed", source="worker",
                             outcome=f"chart not drawn ({type(exc).__name__}); the digest was posted without it")
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
            owner = row.instance.tags.get(policy.OWNER_TAG) or row.owner or NOBODY
            out.person[owner] += _cost(rate, rest)
        out.type[row.instance.type] += _cost(rate, total)
        out.region[row.instance.region] += _cost(rate, total)
    return out


def render(
    rows: list[Row], yesterday: Spend, month: Spend, warnings: list[WarningRecord], now: datetime,
    names: dict[str, str] | None = None,
) -> Message:
    known = names or {}

    def named(person: str) -> str:  # by name: a daily digest must not ping everyone it lists
        return "_no owner_" if person == NOBODY else f"*{escape(known.get(person, person))}*"

    running = [r for r in rows if r.running]
    idle = sorted((r for r in running if r.idle), key=lambda r: -(r.cost_of(r.idle_seconds(now)) or 0))
    burn = sum((r.price.usd_per_hour or Decimal(0) for r in running), Decimal(0))
    head = (
        f":bar_chart: *runctl daily digest* · {now:%A %d %B %Y}\n"
        f"Yesterday *{format_usd(yesterday.total)}* · month to date *{format_usd(month.total)}* · "
        f"burning {format_usd(burn)}/h now ({format_usd(burn * 24)}/day)"
    )
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=clamp(head)))]

    top = sorted(yesterday.person.items(), key=lambda kv: -kv[1])[:3]
    medals = (":first_place_medal:", ":second_place_medal:", ":third_place_medal:")
    if top:
        line = "  ".join(f"{m} {named(p)} {format_usd(v)}" for m, (p, v) in zip(medals, top, strict=False))
        blocks += sections([f"*Top spenders yesterday*  {line}"], 1)
    blocks += _table("Per person", yesterday.person, month.person, named)
    blocks += _table("Per instance type", yesterday.type, month.type, lambda t: f"`{t}`")
    if len({r.instance.region for r in rows}) > 1:
        blocks += _table("Per region", yesterday.region, month.region, lambda r: f"*{r}*")
    blocks += _listing(
        f"Running now ({len(running)})",
        [_running_line(r, named) for r in sorted(running, key=lambda r: -(r.cost or 0))],
        "nothing is running",
    )
    blocks += _listing(
        f"Idle now ({len(idle)})",
        [f"*{r.instance.label}* idle {duration(r.idle_seconds(now))}, that cost "
         f"{format_usd(r.cost_of(r.idle_seconds(now)))} · `/runctl stop {r.id}`" for r in idle],
        "nothing is idle",
    )
    blocks += _listing(
        f"Open warnings ({len(warnings)})",
        [f"{w.kind.value} · {w.label} · {w.status.value}" + (f" by {named(w.acted_by)}" if w.acted_by else "")
         for w in warnings],
        "none",
    )
    unpriced = sum(1 for r in rows if not r.price.known)
    note = "Spend counts every running interval runctl has seen; a run's time goes to whoever started it."
    if unpriced:
        note += f" {unpriced} instance(s) have an unknown price and are left out."
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=note)]))
    return Message(f"runctl digest: yesterday {format_usd(yesterday.total)}, month {format_usd(month.total)}", blocks)


def person_labels(svc: Services, people: Iterable[str]) -> dict[str, str]:
    """Each person's distinct name (users.info, needs `users:read`); "no owner" for nobody."""
    named = labels(svc, (p for p in people if p != NOBODY))
    named[NOBODY] = "no owner"
    return named


def _table(
    title: str, day: dict[str, Decimal], month: dict[str, Decimal], label: Callable[[str], str]
) -> list[SectionBlock]:
    zero = Decimal(0)
    keys = sorted(set(day) | set(month), key=lambda k: -month.get(k, zero))
    lines = [f"{label(k)} — yesterday {format_usd(day.get(k, zero))} · month {format_usd(month.get(k, zero))}"
             for k in keys]
    return _listing(title, lines, "no spend")


def _listing(title: str, lines: list[str], empty: str) -> list[SectionBlock]:
    shown = lines[:LIST_LIMIT] or [f"_{empty}_"]
    if len(lines) > LIST_LIMIT:
        shown.append(f"…and {len(lines) - LIST_LIMIT} more (`/runctl resources --all` lists every instance)")
    return sections([f"*{title}*", *shown], 2)


def _running_line(row: Row, named: Callable[[str], str]) -> str:
    parts = [f"*{row.instance.label}* {row.instance.type}", f"{format_usd(row.cost)} so far"]
    if row.live_run:
        parts.append(f"{named(row.live_run.user_id)} training {code(row.live_run.script, 60)}")
    return " · ".join(parts)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cost(rate: Decimal, seconds: float) -> Decimal:
    return cost_of(rate, seconds) or Decimal(0)
