"""docs/architecture.md's module map names every module of the product, in its room's row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "architecture.md"


def rows() -> list[tuple[str, str]]:
    """(first cell, second cell) of each row of the module table."""
    found = []
    for line in MAP.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            found.append((cells[0], " ".join(cells[1:])))
    return found


def room_row(path: Path, table: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The row for a module: the one naming its folder (`workers/jobs/`), else the one
    naming the file itself beside its folder (`workers/errors.py`, `settings.py`)."""
    rel = path.relative_to(ROOT)
    top = f"`{rel.parts[0]}/`"
    for parent in [p for p in rel.parents if len(p.parts) >= 2]:  # the nearest folder with a row
        for first, second in table:
            if f"`{parent.as_posix()}/`" in first:
                return first, second
    for first, second in table:
        if f"`{rel.as_posix()}`" in first or (first.startswith(f"`{rel.parts[0]}/") and f"`{rel.name}`" in first):
            return first, second
    for first, second in table:
        if first == top:
            return first, second
    return None


def test_every_product_module_is_named_in_its_rooms_row() -> None:
    table = rows()
    missing = []
    for path in sorted([*ROOT.glob("bot/**/*.py"), *ROOT.glob("workers/**/*.py")]):
        if path.name == "__init__.py":
            continue
        row = room_row(path, table)
        named = row is not None and (
            f"`{path.name}`" in row[0]
            or f"`{path.relative_to(ROOT).as_posix()}`" in row[0]
            or re.search(rf"(?<![\w/]){re.escape(path.stem)}(?!\w)", row[1]) is not None
        )
        if not named:
            missing.append(path.relative_to(ROOT).as_posix())
    assert missing == [], f"not in docs/architecture.md's module map: {missing}"
