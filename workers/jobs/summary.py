"""The end of a run says what happened: at its end the monitor (`finish`) reads the run's
summary on the instance in one SSM command (workers/remote/summary.py), prices its time as
`resources` does, and replies with the numbers, the files and a chart; the parent message
keeps the cost and the trackers' link buttons. `/runctl chart <instance|run-id>` draws the
same chart for a live run, in its thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation

from slack_sdk.errors import SlackApiError

from workers.aws import backups
from workers.commands import ChartCommand
from workers.cost.pricing import Price, cost_of, format_usd, hourly_price, load_price_book
from workers.errors import RunctlError
from workers.jobs import funnel, log_access
from workers.jobs.funnel import Job
from workers.jobs.preflight import Refusals, require_running
from workers.remote import summary as remote
from workers.remote.summary import RunSummary
from workers.services import Services
from workers.slack import chart, links
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.slack.messages import summary as words
from workers.state.runs import RUN_ID, Outcome, Run, RunLink

log = logging.getLogger(__name__)

CHAIN_KEY = "runctl:run-cost:"  # + the owner run's id: hash of run id -> its cost (auto-resume chains)
CHAIN_SECONDS = 30 * 86400
# The end's summary runs inside a monitor tick: a slow one costs that tick this long at most.
END_TIMEOUT = 120
# A stop or terminate waits for it before the instance goes, while the instance still bills.
HALT_TIMEOUT = 30
MIN_CHART_POINTS = 3
NOT_PARSED = (
    "No metrics or chart: runctl's log parser did not run on the instance (it needs `python3` on the "
    "SSM agent's PATH, or the interpreter the `runctl:python` tag names)."
)


@dataclass
class Told:
    """What the end of a run found: the summary (None: the instance could not be asked)."""

    summary: RunSummary | None = None
    cost: str = ""
    links: list[RunLink] = field(default_factory=list)
    backed_up: set[str] | None = None

    def files(self) -> str:
        """Checkpoints and outputs; without a summary, the monitor's newest checkpoint as before."""
        if self.summary is not None and self.summary.listing is not None:
            return words.files_text(self.summary.listing, self.summary.total_bytes, self.backed_up)
        return ""

    def details(self) -> str:
        """Lines after the outcome: cost, metrics, TensorBoard directories."""
        lines = [self.cost] if self.cost else []
        if self.summary is not None and not self.summary.parsed:
            lines.append(NOT_PARSED)
        if self.summary is not None:
            lines += [
                t
                for t in (words.metrics_text(self.summary), words.tensorboard_text(self.summary.tensorboard_dirs))
                if t
            ]
        return "\n".join(lines)

    def more(self) -> str:
        """`details` as lines to append to a reply ("" when there are none)."""
        details = self.details()
        return "\n" + details if details else ""


def gather(svc: Services, run: Run, timeout: int = END_TIMEOUT) -> Told:
    """One SSM command for the summary, then the price: every failure leaves its part out."""
    told = Told()
    try:
        told.cost = cost_text(svc, run)
    except RunctlError as exc:
        log.warning("run %s: no cost: %s", run.run_id, exc.what)
    except Exception:
        log.exception("run %s: pricing failed", run.run_id)
    try:
        told.summary = read(svc, run.instance_id, run, timeout)
    except RunctlError as exc:
        log.warning("run %s: no summary: %s", run.run_id, exc.what)
        return told
    told.links = [RunLink(kind=link.kind, url=link.url) for link in links.pick(told.summary.links)]
    owner = run.checkpoint_run_id or run.run_id
    if told.summary.listing is not None and told.summary.listing.checkpoints:
        try:
            stored = backups.load_bound(svc.fleet, owner, svc.runs.get)
            told.backed_up = {f.name for f in stored.files} if stored is not None else set()
        except RunctlError as exc:
            log.warning("run %s: could not read its S3 backup: %s", run.run_id, exc.what)
        except Exception:
            log.exception("run %s: reading its S3 backup failed", run.run_id)
    return told


def read(svc: Services, instance_id: str, run: Run, timeout: int = remote.SUMMARY_TIMEOUT) -> RunSummary:
    script = remote.summary_script(
        svc.settings.RUNCTL_REMOTE_ROOT, run.run_id, run.checkpoint_run_id or run.run_id, run.python
    )
    result = svc.fleet.run(instance_id, script, timeout=timeout)
    if not result.ok:
        raise RunctlError(f"The summary script failed on {instance_id} ({result.status}, exit {result.exit_code}).")
    return remote.parse(result.stdout)


def count_cost(svc: Services, run: Run) -> None:
    """A run whose end had no summary (lost to a spot interruption): its cost still counts in
    the sum an `--auto-resume` run's end reports."""
    try:
        cost_text(svc, run)
    except Exception:
        log.exception("run %s: pricing failed", run.run_id)


def price_source(price: Price) -> str:
    """Where the figure comes from, beside what `Price.describe` says (it names the table's date)."""
    if price.kind == "spot":
        return " (EC2 spot price history)"
    if price.table_date is not None:
        return ""  # "(table of YYYY-MM-DD)": runctl's shipped table
    return " (AWS Price List)"


def cost_text(svc: Services, run: Run) -> str:
    """ "Cost $0.12: 41 s of c5.xlarge at $1.00/h on-demand (AWS Price List)"; a multi-node run
    is the sum over its nodes (each node's price for the run's time); a run that continues
    others (`--auto-resume`) adds the sum over all their instances."""
    start, end = run.started_at, run.ended_at or svc.clock()
    if start is None:
        return ""
    seconds = max(0.0, (end - start).total_seconds())
    priced: list[tuple[str, str, Price]] = []  # (instance id, type, price) per node
    book = load_price_book()
    for iid in run.node_ids:
        inst = svc.fleet.get(iid)
        lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
        price = hourly_price(book, svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle)
        priced.append((iid, inst.type, price))
    amounts = [cost_of(price.usd_per_hour, seconds) for _, _, price in priced]
    known = [a for a in amounts if a is not None]
    amount = sum(known, Decimal(0)) if len(known) == len(amounts) else None
    if len(priced) == 1:
        _, itype, price = priced[0]
        said = f"Cost {format_usd(amount)}: {duration(seconds)} of {code(itype)}"
        if price.known:
            said += f" at {escape(price.describe())}{price_source(price)}"
        else:
            said += f", {escape(price.describe())}"
    else:
        said = node_costs(priced, amounts, amount, seconds)
    chained = run.auto_resume or run.checkpoint_run_id is not None
    if amount is not None and chained:
        owner = run.checkpoint_run_id or run.run_id
        key = CHAIN_KEY + owner
        svc.redis.hset(key, run.run_id, str(amount))
        svc.redis.expire(key, CHAIN_SECONDS)
        parts = svc.redis.hgetall(key)
        if len(parts) > 1:
            total = Decimal(0)
            for value in parts.values():
                try:
                    total += Decimal(value.decode() if isinstance(value, bytes) else str(value))
                except InvalidOperation:
                    continue
            said += f"; {format_usd(total)} over the {len(parts)} runs of `--auto-resume` (each on its own instance)"
    return said + "."


def node_costs(
    priced: list[tuple[str, str, Price]], amounts: list[Decimal | None], amount: Decimal | None, seconds: float
) -> str:
    """A multi-node run's cost: `amount`, the sum over its nodes (None when a node is not
    priced), each node's `amounts` its price for the run's time."""
    n = len(priced)
    known = [a for a in amounts if a is not None]
    total = format_usd(amount)
    rates = {(itype, price.describe(), price_source(price)) for _, itype, price in priced}
    if len(rates) == 1 and priced[0][2].known:
        itype, described, source = rates.pop()
        return (
            f"Cost {total}: {duration(seconds)} of {n} nodes, each {code(itype)} at "
            f"{escape(described)}{source}, summed over the nodes"
        )
    each = "; ".join(
        f"node {k} {code(itype)} {format_usd(amount)}"
        + (f" at {escape(price.describe())}{price_source(price)}" if price.known else f", {escape(price.describe())}")
        for k, ((_, itype, price), amount) in enumerate(zip(priced, amounts, strict=True))
    )
    if len(known) != n and known:
        total += f" (the priced nodes: {format_usd(sum(known, Decimal(0)))})"
    return f"Cost {total}: {duration(seconds)} on {n} nodes, summed over the nodes ({each})"


def keep(run: Run, told: Told) -> None:
    """Before the parent's final update: its cost and links, and the newest checkpoint the
    summary found where the monitor's poll did not look (./checkpoints, ./outputs, --save-dir)."""
    run.outcome = Outcome(cost=told.cost, links=told.links)
    found = words.as_checkpoint(told.summary.listing if told.summary else None)
    if run.checkpoint is None and found is not None:
        run.checkpoint = found


def conclude(svc: Services, run: Run, told: Told) -> None:
    """After the final reply: the chart in the thread."""
    if told.summary is None or run.message_ts is None:
        return
    post_chart(svc, run, told.summary, f"run {run.run_id} · {run.script}", comment="")


def post_chart(svc: Services, run: Run, summary: RunSummary, title: str, comment: str) -> bool:
    """The PNG of the run's curves in its thread; False when there are fewer than three points."""
    series = {n: pts for n, pts in summary.chartable().items() if len(pts) >= MIN_CHART_POINTS}
    if not series or run.message_ts is None:
        return False
    sorts = {name: remote.metric_kind(name) for name in series}
    png = chart.run_chart(title, series, summary.kinds, sorts)
    if png is None:
        return False
    name = f"{run.run_id}-metrics.png"
    try:
        svc.notifier.upload(
            run.channel_id,
            name,
            png,
            title=f"Metrics of run {run.run_id}",
            comment=comment,
            thread_ts=run.message_ts,
            alt=chart.run_alt(title, series, sorts),
        )
    except SlackApiError as exc:
        log.warning("run %s: chart not uploaded: %s", run.run_id, exc.response.get("error"))
        return False
    return True


@funnel.command(ChartCommand)
def chart_command(job: Job, cmd: ChartCommand) -> str:
    """`/runctl chart <instance|run-id>`: the run's curves now, in its thread."""
    svc = job.svc
    run = find_run(svc, cmd.target)
    job.instance_id = run.instance_id
    log_access.check(svc.settings, job.actor, run, run.run_id, run.instance_id)
    if run.message_ts and run.channel_id == job.actor.channel_id:
        job.thread_ts = run.message_ts
    inst = svc.fleet.get(run.instance_id)
    require_running(
        inst,
        Refusals(
            stopped=", so its run's log cannot be read.",
            stopped_why="The chart is drawn from the log on the instance's disk, read through SSM.",
            stopped_fix=f"/runctl start {run.instance_id}",
            gone="; its disk and the run's log are gone.",
            pending_why="Its SSM agent needs a minute.",
        ),
    )
    svc.fleet.require_agent(inst, "reads training logs")
    found = read(svc, run.instance_id, run)
    drawn = post_chart(
        svc,
        run,
        found,
        f"run {run.run_id} · {run.script} · {datetime_text(svc.clock())}",
        comment=f"<@{job.actor.user_id}>",
    )
    if not drawn:
        raise RunctlError(
            f"Run {code(run.run_id)} has reported fewer than three points of any metric so far.",
            why="runctl reads `name=value` pairs, `epoch N/M` lines, tqdm postfixes and the progress file.",
            fix=f"/runctl logs {run.instance_id} --run {run.run_id}",
        )
    metrics = words.metrics_text(found)
    job.tell(f"Chart of run {code(run.run_id)} posted in its thread." + (f"\n{metrics}" if metrics else ""))
    return f"chart of {run.run_id}: {len(found.chartable())} series"


def find_run(svc: Services, target: str) -> Run:
    """A run id, or an instance: its live run, else its newest run that started."""
    if target.startswith("i-"):
        live = svc.runs.live_on(target)
        if live is not None:
            return live
        started = [r for r in svc.runs.history(target, 20) if r.started_at is not None]
        if started:
            return started[0]
        raise RunctlError(f"No run of runctl's has started on `{target}`.", fix=f"/runctl status {target}")
    run = svc.runs.get(target) if RUN_ID.fullmatch(target) else None
    if run is None or run.started_at is None:
        raise RunctlError(f"runctl knows no started run {code(target)}.", fix="/runctl status <instance-id>")
    return run


def datetime_text(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M} UTC"
