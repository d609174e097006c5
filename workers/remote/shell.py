"""The shell pieces every script shares: the header that names the remote root, quoting,
the section marker of records, the run directory, and how the interpreter is written.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on the first
line, by ``header``), and every value that came from a user through ``shlex.quote``.
"""

from __future__ import annotations

import secrets
import shlex

q = shlex.quote

SECTION = "::runctl::"


def header(root: str) -> str:
    return f"RUNCTL_ROOT={q(root)}\nset -u\nexport RUNCTL_ROOT\n"


def home() -> str:
    """The SSM agent gives scripts no HOME: set the user's own, for tools that read it."""
    return (
        '[ -n "${HOME:-}" ] || HOME=$(getent passwd "$(id -u)" 2>/dev/null | cut -d: -f6)\n'
        '[ -n "$HOME" ] || HOME=/root\n'
        "export HOME\n"
    )


def run_dir(run_id: str) -> str:
    return f'"$RUNCTL_ROOT/runs/"{q(run_id)}'


def heredoc_end(body: str) -> str:
    """A quoted here-document's end word that no line of ``body`` can match."""
    while True:
        eof = "RUNCTL_EOF_" + secrets.token_hex(6)
        if eof not in body:
            return eof


def interpreter(python: str) -> str:
    """The interpreter as shell text; an environment under ``$RUNCTL_ROOT/`` keeps the root expanded."""
    prefix = "$RUNCTL_ROOT/"
    if python.startswith(prefix):
        return f'"$RUNCTL_ROOT"/{q(python[len(prefix) :])}'
    return q(python)
