"""Log bytes made Slack-safe: decoded (invalid UTF-8 replaced), terminal escape codes
removed, carriage-return redraws reduced to what a terminal shows, control characters
replaced, long lines cut, then escaped (workers.slack.escape) and packed into code blocks
that each fit a section's 3,000 characters."""

from __future__ import annotations

import re

from workers.slack.escape import block, escape

REPLACEMENT = "\ufffd"
LINE_CHARS = 1_000  # escaped characters of one line shown; the rest is counted
BLOCK_CHARS = 2_900  # escaped characters in one code block (a section holds 3,000)
# CSI (colours, cursor moves), OSC (titles, links; ended by BEL or ST), and two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_lines(data: bytes) -> list[str]:
    """The lines a person would read in a terminal, as plain text."""
    text = data.decode("utf-8", errors="replace")
    lines: list[str] = []
    for raw in text.split("\n"):
        line = _ANSI.sub("", raw).rstrip("\r")
        line = line.rsplit("\r", 1)[-1]  # a progress bar redrawn with \r: its last state
        lines.append(_CONTROL.sub(REPLACEMENT, line))
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the file
    return lines


def shown_line(line: str) -> str:
    """One line escaped, cut to LINE_CHARS escaped characters (never inside an entity)."""
    out: list[str] = []
    used = 0
    for i, ch in enumerate(line):
        piece = escape(ch)
        if used + len(piece) > LINE_CHARS:
            return "".join(out) + f" …[+{len(line) - i:,} characters]"
        out.append(piece)
        used += len(piece)
    return "".join(out)


def code_blocks(lines: list[str]) -> list[str]:
    """Code blocks (```…```) of whole escaped lines, each within BLOCK_CHARS."""
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        shown = shown_line(line) or " "
        if current and size + len(shown) + 1 > BLOCK_CHARS:
            blocks.append(_fence(current))
            current, size = [], 0
        current.append(shown)
        size += len(shown) + 1
    if current:
        blocks.append(_fence(current))
    return blocks


def _fence(escaped_lines: list[str]) -> str:
    # Already escaped: only wrap (escape.block would escape the entities again).
    inner = "\n".join(escaped_lines)
    return f"```{inner}```" if inner.strip() else block("")
