"""The launch caps. Every action that makes a launched instance cost money (a launch, a
start, a spot replacement, and the size of its disk) passes `admit`: the caps are checked
and the action taken under one Redis lock, so two actions at once cannot both squeeze under
a cap."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from redis.exceptions import LockError

from workers import policy
from workers.aws import launcher
from workers.aws.instance import Instance
from workers.aws.launcher import Held, Launcher, LaunchFile, Spec
from workers.cost import disk, fleetview
from workers.cost.pricing import Price, format_rate, hourly_price, load_price_book, on_demand_price, spot_price
from workers.errors import AwsError, ConfigError, PermissionDenied, RunConflict
from workers.services import Services

log = logging.getLogger(__name__)
CAPS_LOCK = "runctl:launch:caps"
CAPS_LOCK_SECONDS = 120


@dataclass(frozen=True)
class Quote:
    usd_per_hour: Decimal | None
    kind: str  # "on-demand" | "spot"
    zone: str
    table_date: date | None = None  # set when the figure is the shipped table's, not the Price List's

    def text(self) -> str:
        if self.usd_per_hour is None:
            return f"price unknown ({self.kind})"
        rate = f"${format_rate(self.usd_per_hour)}/h"
        if self.kind == "spot":
            return f"{rate} spot in {self.zone}"
        return f"{rate} on-demand{self.dated(' (', ')')}"

    def dated(self, before: str = " ", after: str = "") -> str:
        """Where the figure is the shipped table's: "price from the table of 2025-05-01"."""
        return f"{before}price from the table of {self.table_date:%Y-%m-%d}{after}" if self.table_date else ""


@dataclass(frozen=True)
class Ask:
    """One action that adds spend, and whose caps it counts against."""

    what: str  # "Launch", "Start of *gpu-1*", "Replacement launch": the refusal's first words
    user_id: str  # whose caps: the person the instance is launched for (its runctl:user tag)
    price: Quote
    fix: str  # the exact command(s) that get past a cap
    requester_id: str = ""  # who asked; "you" in the refusal when it is user_id
    disk_gb: int | None = None  # a new volume's size; None when none is made (a start)
    disk_default: int | None = None  # the launch file's size for it: always allowed
    admin: bool = False  # may ask a disk past `disk_gb` up to `admin_disk_gb`
    region: str = ""


def quote(svc: Services, config: LaunchFile, spec: Spec) -> Quote:
    zone = Launcher(svc.fleet).zone_of(config.template.subnets[0])
    if spec.spot:
        try:
            rate = spot_price(svc.fleet, svc.redis, zone, spec.instance_type)
        except AwsError as exc:  # shown as "price unknown", never a guess (and the $/h caps refuse it)
            log.warning("spot price of %s in %s: %s", spec.instance_type, zone, exc.what)
            rate = None
        return Quote(rate, "spot", zone)
    price = on_demand(svc, spec.region, spec.instance_type)
    return Quote(price.usd_per_hour, "on-demand", zone, price.table_date)


def on_demand(svc: Services, region: str, instance_type: str) -> Price:
    """A launch's on-demand price, as `/runctl resources` prices a running instance: the Price
    List API (cached), else the shipped table with its date."""
    return on_demand_price(load_price_book(), svc.fleet, svc.redis, region, instance_type)


def quote_instance(svc: Services, inst: Instance) -> Quote:
    """What an existing instance costs an hour once it runs (as `/runctl resources` prices it)."""
    lifecycle = None if inst.lifecycle == "on-demand" else inst.lifecycle
    price = hourly_price(
        load_price_book(), svc.fleet, svc.redis, inst.region, inst.availability_zone, inst.type, lifecycle
    )
    return Quote(price.usd_per_hour, price.kind, inst.availability_zone, price.table_date)


def default_disk(config: LaunchFile, spec: Spec) -> int:
    preset = config.presets.get(spec.preset)
    return (preset.disk_gb if preset else None) or config.template.disk_gb


def held(rows: list[fleetview.Row], user_id: str) -> Held:
    mine = [r for r in rows if r.instance.tags.get(launcher.OWNER_TAG) == user_id]
    every = launcher.launched(r.instance for r in rows)
    ids = {i.id for i in every}
    team = [r for r in rows if r.id in ids]
    mine = [r for r in mine if r.id in ids]
    return Held(
        user_instances=len(mine),
        user_usd_per_hour=sum((r.price.usd_per_hour or Decimal(0) for r in mine), Decimal(0)),
        team_instances=len(team),
        team_usd_per_hour=sum((r.price.usd_per_hour or Decimal(0) for r in team), Decimal(0)),
        unpriced=sum(1 for r in team if r.price.usd_per_hour is None),
    )


def _disk_problem(config: LaunchFile, ask: Ask) -> str | None:
    gb, limits = ask.disk_gb, config.limits
    if gb is None or gb == ask.disk_default:
        return None
    allowed = limits.admin_disk_gb if ask.admin else limits.disk_gb
    if gb <= allowed:
        return None
    cost = disk.monthly(ask.region, gb)
    priced = f" (about ${cost:,.2f} a month)" if cost is not None else ""
    return (
        f"a {gb} GB disk{priced} is past the cap: up to {limits.disk_gb} GB for everyone, "
        f"{limits.admin_disk_gb} GB for admins; without `--disk` it gets {ask.disk_default} GB"
    )


def check(config: LaunchFile, now_held: Held, ask: Ask) -> None:
    """Refuse past a cap, with the numbers and what to do."""
    limits = config.limits
    rate = ask.price.usd_per_hour or Decimal(0)
    you = ask.requester_id in ("", ask.user_id)
    who, run = ("you", "run") if you else (f"<@{ask.user_id}>", "runs")
    problems: list[str] = []
    if now_held.user_instances + 1 > limits.user_instances:
        problems.append(
            f"{who} already {run} {now_held.user_instances} launched instance"
            f"{'s' if now_held.user_instances != 1 else ''}; the cap is {limits.user_instances} per person"
        )
    if now_held.user_usd_per_hour + rate > limits.user_usd_per_hour:
        would = "you would burn" if you else f"<@{ask.user_id}> would burn"
        problems.append(
            f"{would} ${format_rate(now_held.user_usd_per_hour + rate)}/h "
            f"(${format_rate(now_held.user_usd_per_hour)}/h now + ${format_rate(rate)}/h{ask.price.dated()}); "
            f"the cap is ${format_rate(limits.user_usd_per_hour)}/h per person"
        )
    if now_held.team_instances + 1 > limits.team_instances:
        problems.append(
            f"the team runs {now_held.team_instances} launched instances; the cap is {limits.team_instances}"
        )
    if now_held.team_usd_per_hour + rate > limits.team_usd_per_hour:
        problems.append(
            f"the team would burn ${format_rate(now_held.team_usd_per_hour + rate)}/h; "
            f"the cap is ${format_rate(limits.team_usd_per_hour)}/h"
        )
    if ask.price.usd_per_hour is None:
        problems.append("its price is unknown, so it cannot be counted against the $/h caps")
    too_big = _disk_problem(config, ask)
    if too_big:
        problems.append(too_big)
    if problems:
        raise PermissionDenied(
            f"{ask.what} refused: " + "; ".join(problems) + ".",
            why="The caps are in the launch file (RUNCTL_LAUNCH_FILE, `[limits]`); launches, starts of "
            "launched instances and spot replacements all count against them.",
            fix=ask.fix,
        )


def stop_one_first(user_id: str) -> str:
    return (
        f"Stop one first (`/runctl resources --user <@{user_id}>` lists them, `/runctl stop <instance>` "
        "stops one), or ask an admin to raise `[limits]` in the launch file."
    )


@contextlib.contextmanager
def admit(svc: Services, config: LaunchFile, ask: Ask, exclude: frozenset[str] = frozenset()) -> Iterator[None]:
    """Check the caps and hold them while the body spends: launches, starts and replacements
    are checked one at a time, each seeing what the previous one started."""
    lock = svc.redis.lock(CAPS_LOCK, timeout=CAPS_LOCK_SECONDS)
    if not lock.acquire(blocking_timeout=30):
        raise RunConflict(
            f"Other launches and starts kept the caps check busy for 30 s; {ask.what.lower()} did not happen.",
            why="Everything that makes a launched instance cost money is checked against the caps one at a time.",
            fix="The same command again in a minute.",
        )
    try:
        rows = [r for r in fleetview.view(svc, svc.clock()) if r.id not in exclude]
        check(config, held(rows, ask.user_id), ask)
        yield
    finally:
        with contextlib.suppress(LockError):  # it outlived its timeout: the next one already took it
            lock.release()


def admit_start(svc: Services, inst: Instance, requester_id: str) -> contextlib.AbstractContextManager[None]:
    """A start of a launched instance counts against its launcher's caps; instances runctl did
    not launch are the admins' fleet, outside the launch caps."""
    if launcher.PRESET_TAG not in inst.tags:
        return contextlib.nullcontext()
    try:
        config = launcher.load(svc.settings.RUNCTL_LAUNCH_FILE)
    except ConfigError as exc:  # no caps to check against: it stays stopped
        raise ConfigError(
            f"{inst.label} was launched by runctl and counts against the launch caps, but they "
            f"cannot be read: {exc.what}",
            why=exc.why,
            fix=exc.fix,
        ) from None
    owner = policy.tag_owner(inst.tags) or requester_id
    ask = Ask(
        what=f"Start of *{inst.label}*",
        user_id=owner,
        requester_id=requester_id,
        price=quote_instance(svc, inst),
        fix=f"{stop_one_first(owner)} Then `/runctl start {inst.id}` again.",
    )
    return admit(svc, config, ask)
