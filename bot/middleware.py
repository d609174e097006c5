"""Per-listener middleware: parse first, then the checks, before anything is queued."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slack_bolt import Ack

from bot.grammar import parse
from workers.errors import UsageError


def parse_command(ack: Ack, body: dict[str, Any], context: dict[str, Any], next: Callable[[], None]) -> None:
    try:
        context["command"] = parse(body.get("text", ""))
    except UsageError as exc:
        ack(text=exc.as_text(), response_type="ephemeral")
        return
    next()
