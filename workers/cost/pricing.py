"""EC2 hourly prices: the shipped on-demand table and live, Redis-cached spot quotes.

No figure is ever invented: a type or region missing from the table, or a spot
market AWS reports nothing for, is ``None`` and shows as "price unknown".
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, Protocol

from workers.cost.pricelist import parse_price_item
from workers.errors import AwsError

if TYPE_CHECKING:
    from redis import Redis

PriceKind = Literal["on-demand", "spot"]

SPOT_CACHE_SECONDS = 3600
SPOT_KEY_PREFIX = "runctl:price:spot:"
ON_DEMAND_CACHE_SECONDS = 86400
ON_DEMAND_KEY_PREFIX = "runctl:price:on-demand:"
# After the Price List API failed (denied, unreachable), the table answers for this long.
ON_DEMAND_RETRY_SECONDS = 600
_API_DOWN = "unavailable"
# Stored when AWS has no spot price, so unknown types are not re-queried every sweep.
_SPOT_MISS = "none"

UNKNOWN = "price unknown"
DENIED_CODES = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")


class SpotQuotes(Protocol):
    """Where spot quotes come from: the fleet's AWS boundary (`Fleet.spot_price_history`)."""

    def spot_price_history(self, availability_zone: str, instance_type: str) -> list[Mapping[str, Any]]: ...


class Quotes(SpotQuotes, Protocol):
    """Spot quotes and the Price List API's on-demand entries (`Fleet.on_demand_products`)."""

    def on_demand_products(self, region: str, instance_type: str) -> list[str]: ...


_CENT = Decimal("0.01")
_SECONDS_PER_HOUR = Decimal(3600)


class PriceBook:
    """On-demand USD/hour prices by region and instance type."""

    def __init__(self, as_of: date, source: str, prices: Mapping[str, Mapping[str, Decimal]]) -> None:
        self._as_of = as_of
        self._source = source
        self._prices = {region: dict(types) for region, types in prices.items()}

    @classmethod
    def from_json(cls, text: str) -> PriceBook:
        """Parse and validate the prices.json document; refuse anything but positive USD."""
        doc = json.loads(text)
        if doc.get("currency") != "USD":
            raise ValueError(f"price table currency must be USD, got {doc.get('currency')!r}")
        prices: dict[str, dict[str, Decimal]] = {}
        for region, types in doc["regions"].items():
            prices[region] = {
                instance_type: _positive_decimal(raw, f"{region}/{instance_type}")
                for instance_type, raw in types.items()
            }
        return cls(date.fromisoformat(doc["as_of"]), str(doc["source"]), prices)

    @property
    def as_of(self) -> date:
        return self._as_of

    @property
    def source(self) -> str:
        return self._source

    def on_demand(self, region: str, instance_type: str) -> Decimal | None:
        return self._prices.get(region, {}).get(instance_type)

    def instance_types(self, region: str) -> frozenset[str]:
        return frozenset(self._prices.get(region, {}))


@functools.cache
def load_price_book() -> PriceBook:
    """The table shipped as package data (workers/data/prices.json), parsed once."""
    text = resources.files("workers").joinpath("data/prices.json").read_text(encoding="utf-8")
    return PriceBook.from_json(text)


def spot_price(quotes: SpotQuotes, redis: Redis, availability_zone: str, instance_type: str) -> Decimal | None:
    """Current Linux spot price in one AZ, cached in Redis for an hour (misses too).
    Raises AwsError (typed at the fleet boundary) when AWS does not answer."""
    key = f"{SPOT_KEY_PREFIX}{availability_zone}:{instance_type}"
    cached = _as_text(redis.get(key))
    if cached is not None:
        return None if cached == _SPOT_MISS else Decimal(cached)

    # Filter again here: not every EC2 endpoint (moto, for one) honours AvailabilityZone.
    entries = [
        entry
        for entry in quotes.spot_price_history(availability_zone, instance_type)
        if entry.get("AvailabilityZone") == availability_zone and "SpotPrice" in entry and "Timestamp" in entry
    ]
    newest = max(entries, key=lambda entry: entry["Timestamp"], default=None)
    price = None if newest is None else _positive_decimal(newest["SpotPrice"], key)
    redis.set(key, _SPOT_MISS if price is None else str(price), ex=SPOT_CACHE_SECONDS)
    return price


@dataclass(frozen=True)
class Price:
    usd_per_hour: Decimal | None
    kind: PriceKind
    unknown_why: str = ""  # why a price is unknown, when that is not simply "no such price"
    table_date: date | None = None  # set when the figure is the shipped table's, not AWS's today

    @property
    def known(self) -> bool:
        return self.usd_per_hour is not None

    def describe(self) -> str:
        if self.usd_per_hour is None:
            return f"{UNKNOWN} ({self.unknown_why})" if self.unknown_why else UNKNOWN
        suffix = " spot" if self.kind == "spot" else ""
        dated = f" (table of {self.table_date:%Y-%m-%d})" if self.table_date else ""
        return f"${format_rate(self.usd_per_hour)}/h{suffix}{dated}"


def on_demand_price(book: PriceBook, quotes: Quotes, redis: Redis, region: str, instance_type: str) -> Price:
    """Today's Linux on-demand price from the Price List API, cached in Redis for a day;
    the shipped table (its date on the price) when the API has none or does not answer."""
    key = f"{ON_DEMAND_KEY_PREFIX}{region}:{instance_type}"
    cached = _as_text(redis.get(key))
    if cached is None:
        try:
            rows = [
                row
                for raw in quotes.on_demand_products(region, instance_type)
                if (row := parse_price_item(json.loads(raw))) is not None and row[:2] == (region, instance_type)
            ]
            prices = {row[2] for row in rows}
            cached = format(prices.pop().normalize(), "f") if len(prices) == 1 else _SPOT_MISS
            redis.set(key, cached, ex=ON_DEMAND_CACHE_SECONDS)
        except (AwsError, ValueError):
            cached = _API_DOWN
            redis.set(key, cached, ex=ON_DEMAND_RETRY_SECONDS)
    if cached not in (_SPOT_MISS, _API_DOWN):
        return Price(Decimal(cached), "on-demand")
    table = book.on_demand(region, instance_type)
    return Price(table, "on-demand", table_date=book.as_of if table is not None else None)


def hourly_price(
    book: PriceBook,
    quotes: Quotes,
    redis: Redis,
    region: str,
    az: str,
    instance_type: str,
    lifecycle: str | None,
) -> Price:
    """What an instance costs per hour; ``lifecycle`` is EC2's ``InstanceLifecycle``.

    Only plain on-demand (no lifecycle) and spot are priced. Capacity blocks and
    scheduled instances are billed on other schedules, so they are "unknown"
    rather than shown at an on-demand figure that would be wrong.
    """
    if lifecycle == "spot":
        try:
            return Price(spot_price(quotes, redis, az, instance_type), "spot")
        except AwsError as exc:  # a cost listing still answers, without this one figure
            denied = exc.code in DENIED_CODES
            return Price(None, "spot", "no permission for spot prices" if denied else "AWS did not answer")
    if lifecycle is None:
        return on_demand_price(book, quotes, redis, region, instance_type)
    return Price(None, "on-demand")


def cost_of(rate: Decimal | None, seconds: float | Decimal) -> Decimal | None:
    """What `seconds` of running cost at `rate` USD/hour; None when the rate is unknown."""
    if rate is None:
        return None
    return rate * Decimal(seconds) / _SECONDS_PER_HOUR


def format_usd(amount: Decimal | None) -> str:
    """An amount of money: "$1,234.56", "<$0.01" for a positive sub-cent, or "price unknown"."""
    if amount is None:
        return UNKNOWN
    if amount < 0:
        raise ValueError(f"a cost cannot be negative: {amount}")
    if 0 < amount < _CENT:
        return "<$0.01"
    return f"${amount.quantize(_CENT, rounding=ROUND_HALF_UP):,}"


def format_rate(rate: Decimal) -> str:
    """An hourly rate exactly as published, at least to the cent: 1.006, 0.10, 98.32."""
    text = format(rate.normalize(), "f")
    whole, _, fraction = text.partition(".")
    return f"{int(whole):,}.{fraction.ljust(2, '0')}"


def _positive_decimal(raw: object, what: str) -> Decimal:
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ValueError(f"{what}: {raw!r} is not a decimal price") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"{what}: {raw!r} is not a positive price")
    return value


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"unexpected Redis reply {value!r}")
