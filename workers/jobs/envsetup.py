"""Placeholder: the training-environment issue fills this in."""

from __future__ import annotations

from workers.context import Services
from workers.runs import Run


def prepare(svc: Services, run: Run, bundle_url: str | None) -> str:
    """Return the interpreter the run should use."""
    return "python3"
