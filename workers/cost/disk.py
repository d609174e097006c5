"""What a launched instance's root volume (gp3) costs a month.

The figures are AWS's list prices for gp3 storage, USD per GB-month, from the Amazon EBS
pricing page (https://aws.amazon.com/ebs/pricing/, "General Purpose SSD (gp3) - Storage"),
read in 2025; IOPS and throughput past gp3's free baseline are not provisioned by runctl.
A region missing here shows as "price unknown", never a guess.
"""

from __future__ import annotations

from decimal import Decimal

from workers.cost.pricing import UNKNOWN, format_rate, format_usd

GP3_USD_PER_GB_MONTH: dict[str, Decimal] = {
    "us-east-1": Decimal("0.08"),
    "us-east-2": Decimal("0.08"),
    "us-west-2": Decimal("0.08"),
}
SOURCE = "AWS list price for gp3 storage, aws.amazon.com/ebs/pricing"


def monthly(region: str, gb: int) -> Decimal | None:
    rate = GP3_USD_PER_GB_MONTH.get(region)
    return None if rate is None else rate * gb


def describe(region: str, gb: int) -> str:
    """The disk's line in a quote: its size, its monthly price and where the price comes from."""
    rate = GP3_USD_PER_GB_MONTH.get(region)
    if rate is None:
        return f"{gb} GB gp3 disk: {UNKNOWN} (no gp3 price on file for {region})"
    return (
        f"{gb} GB gp3 disk: {format_usd(rate * gb)} a month, running or stopped, until terminated "
        f"(${format_rate(rate)}/GB-month in {region}, {SOURCE})"
    )
