"""How records stay ours: a script's stdout holds only records (`::runctl::<word> ...`) made
of text the script itself writes; every byte the instance decides (file contents, file and
directory names, log lines, a tool's output) travels inside one as an encoded token, so
nothing training writes can start, end or forge a record. POSIX tools only: `base64` where
the instance has it, else `od` (POSIX), as ``b<base64>`` or ``x<hex>``.
"""

from __future__ import annotations

import base64
import binascii

# Shell: `... | enc` prints its stdin as one token; `enc_word "$v"` prints a value's.
ENC = (
    "if command -v base64 >/dev/null 2>&1; then\n"
    "  enc() { printf b; base64 | tr -d '\\n'; }\n"
    "else\n"
    "  enc() { printf x; od -An -v -tx1 | tr -d ' \\n'; }\n"
    "fi\n"
    "enc_word() { printf '%s' \"$1\" | enc; }\n"
)


def decode(token: str) -> bytes | None:
    """A token's bytes; None for anything `enc` could not have printed (or a cut token)."""
    kind, data = token[:1], token[1:].strip()
    try:
        if kind == "b":
            return base64.b64decode(data, validate=True)
        if kind == "x" and len(data) % 2 == 0:
            return bytes.fromhex(data)
    except (binascii.Error, ValueError):
        return None
    return None


def text(token: str) -> str | None:
    """A token as text (invalid UTF-8 replaced), for what is shown or parsed, never acted on."""
    raw = decode(token)
    return None if raw is None else raw.decode("utf-8", "replace")


def name(token: str) -> str | None:
    """A token as a name to act on: valid UTF-8 with no NUL, newline or CR, else None."""
    raw = decode(token)
    if raw is None:
        return None
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if any(c in value for c in "\0\n\r") else value
