"""The Price List API, which moto lacks."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

from runctl_sandbox.wire import ApiError, iso, now

# Realistic prices for the whole Price List (their sources are in the file), served once
# published: `scripts/update_prices.py --endpoint-url` regenerates the shipped table from them.
CATALOGUE = Path(__file__).with_name("price_catalogue.json")


class PriceList:
    """The Price List API (``pricing:GetProducts``), which moto lacks: entries shaped like
    AWS's (product attributes, OnDemand terms), empty until ``set``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []
        self.denied = False
        self.calls = 0

    def set(self, region: str, instance_type: str, usd_per_hour: str) -> None:
        sku = uuid.uuid4().hex[:16].upper()
        attributes = {
            "instanceType": instance_type,
            "regionCode": region,
            "operatingSystem": "Linux",
            "tenancy": "Shared",
            "preInstalledSw": "NA",
            "capacitystatus": "Used",
            "licenseModel": "No License required",
        }
        term = {
            "sku": sku,
            "offerTermCode": "JRTCKXETXF",
            "priceDimensions": {
                f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": "Hrs",
                    "pricePerUnit": {"USD": usd_per_hour},
                    "description": f"${usd_per_hour} per On Demand Linux {instance_type} Instance Hour",
                }
            },
        }
        item = {
            "product": {"productFamily": "Compute Instance", "attributes": attributes, "sku": sku},
            "serviceCode": "AmazonEC2",
            "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": term}},
            "publicationDate": iso(now()),
        }
        with self._lock:
            self._items.append(item)

    def publish_catalogue(self, path: Path = CATALOGUE) -> int:
        """Serve every price of the catalogue; how many."""
        regions: dict[str, dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))["regions"]
        for region, types in regions.items():
            for instance_type, usd in types.items():
                self.set(region, instance_type, usd)
        return sum(map(len, regions.values()))

    def reset(self) -> None:
        with self._lock:
            self._items.clear()
            self.denied, self.calls = False, 0

    def get_products(self, payload: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            if self.denied:
                raise ApiError("AccessDeniedException", "User is not authorized to perform: pricing:GetProducts", 400)
            if payload.get("ServiceCode") != "AmazonEC2":
                return {"FormatVersion": "aws_v1", "PriceList": []}
            wanted = [(f.get("Field"), f.get("Value")) for f in payload.get("Filters") or []]
            found = [
                json.dumps(item)
                for item in self._items
                if all(item["product"]["attributes"].get(field) == value for field, value in wanted)
            ]
        return {"FormatVersion": "aws_v1", "PriceList": found}
