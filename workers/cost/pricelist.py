"""Reading the AWS Price List (``pricing:GetProducts``, ServiceCode AmazonEC2): which
entries are the plain Linux on-demand price of an instance type, and that price."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

# The product attributes that make a price the plain Linux on-demand one.
REQUIRED_ATTRIBUTES = {
    "operatingSystem": "Linux",
    "tenancy": "Shared",
    "preInstalledSw": "NA",
    "capacitystatus": "Used",
}

PriceRow = tuple[str, str, Decimal]


def filters(region: str, instance_type: str | None = None) -> list[dict[str, str]]:
    """GetProducts TERM_MATCH filters for one region (and one type)."""
    fields = {**REQUIRED_ATTRIBUTES, "regionCode": region}
    if instance_type:
        fields["instanceType"] = instance_type
    return [{"Type": "TERM_MATCH", "Field": field, "Value": value} for field, value in fields.items()]


def parse_price_item(item: Mapping[str, Any]) -> PriceRow | None:
    """(region, instance type, USD/hour) from one decoded PriceList entry.

    None when the entry is not a plain Linux on-demand instance price (another OS
    or tenancy, or the $0 rows AWS lists for e.g. reservations). Raises
    ValueError when it claims to be one but its price cannot be read.
    """
    attributes = item.get("product", {}).get("attributes", {})
    if any(attributes.get(name) != value for name, value in REQUIRED_ATTRIBUTES.items()):
        return None
    region = attributes.get("regionCode")
    instance_type = attributes.get("instanceType")
    if not region or not instance_type:
        return None

    hourly = {
        _usd(dimension)
        for term in item.get("terms", {}).get("OnDemand", {}).values()
        for dimension in term.get("priceDimensions", {}).values()
        if dimension.get("unit") == "Hrs"
    }
    hourly.discard(Decimal(0))
    if not hourly:
        return None
    if len(hourly) > 1:
        raise ValueError(f"{region} {instance_type}: several hourly prices {sorted(hourly)}")
    return region, instance_type, hourly.pop()


def _usd(dimension: Mapping[str, Any]) -> Decimal:
    raw = dimension.get("pricePerUnit", {}).get("USD")
    try:
        return Decimal(raw)
    except (InvalidOperation, TypeError):
        raise ValueError(f"unreadable USD price {raw!r}") from None
