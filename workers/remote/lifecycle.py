"""Lifecycle scripts: stop a training run before its instance is stopped or terminated.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line), and every value that came from a user through ``shlex.quote``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.remote.core import header, run_dir

_RESULT = re.compile(r"^stopped (term|kill|none)(?: (\d+))?(?: (\d+))?\s*$", re.MULTILINE)
_SAVED = re.compile(r"^saved (.+)$", re.MULTILINE)


def stop_run(
    root: str, run_id: str, grace: int, force: bool = False, checkpoint_run_id: str | None = None
) -> str:
    """SIGTERM the run's process group, wait up to `grace` seconds, then SIGKILL it.

    `force` sends SIGKILL straight away. Prints ``saved <name>`` for each checkpoint
    written after the signal (in the directory of `checkpoint_run_id`, default the run's
    own), then ``stopped <term|kill|none> <waited-seconds> <signal-epoch-seconds>``
    (``stopped none`` when nothing was alive); ``parse_stop`` reads them.
    """
    first = "KILL" if force else "TERM"
    return header(root) + (
        f"RUN_DIR={run_dir(run_id)}\n"
        f"CK_DIR={run_dir(checkpoint_run_id or run_id)}/checkpoints\n"
        f"GRACE={0 if force else int(grace)}\n"
        'pid=$(cat "$RUN_DIR/pid" 2>/dev/null || true)\n'
        'pgid=$(cat "$RUN_DIR/pgid" 2>/dev/null || true)\n'
        'case "$pid" in ""|*[!0-9]*) echo "stopped none"; exit 0 ;; esac\n'
        'case "$pgid" in ""|*[!0-9]*) pgid="" ;; esac\n'
        'if ! kill -0 "$pid" 2>/dev/null; then echo "stopped none"; exit 0; fi\n'
        "signal_group() {\n"
        # The wrapper shell leads the group and traps TERM, so it survives to
        # record the exit code; the training and its workers get the signal.
        '  if [ -n "$pgid" ]; then kill -"$1" -"$pgid" 2>/dev/null || kill -"$1" "$pid" 2>/dev/null\n'
        '  else kill -"$1" "$pid" 2>/dev/null; fi\n'
        "}\n"
        "signalled=$(date +%s)\n"
        'echo "$signalled" > "$RUN_DIR/stop_requested"\n'
        f"signal_group {first} || true\n"
        "waited=0\n"
        'while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$GRACE" ]; do\n'
        "  sleep 1; waited=$((waited + 1))\n"
        "done\n"
        'if kill -0 "$pid" 2>/dev/null || [ "$GRACE" -eq 0 ]; then\n'
        "  signal_group KILL || true\n"
        '  echo 137 > "$RUN_DIR/exit_code.tmp" && mv "$RUN_DIR/exit_code.tmp" "$RUN_DIR/exit_code"\n'
        "  how=kill\n"
        "else\n"
        "  how=term; n=0\n"
        '  while [ ! -f "$RUN_DIR/exit_code" ] && [ "$n" -lt 5 ]; do sleep 1; n=$((n + 1)); done\n'
        "fi\n"
        # -newer compares full timestamps; whole seconds can't tell a save just
        # before the signal from one just after it. `! -name . -prune`: no recursion.
        'if [ -d "$CK_DIR" ]; then\n'
        '  find "$CK_DIR/." ! -name . -prune -newer "$RUN_DIR/stop_requested" ! -name ".*" '
        "! -name manifest.json ! -name completed.json -print 2>/dev/null | while IFS= read -r f; do\n"
        '    echo "saved ${f##*/}"\n'
        "  done\n"
        "fi\n"
        'echo "stopped $how $waited $signalled"\n'
    )


@dataclass(frozen=True)
class StopResult:
    how: str  # "term": exited after SIGTERM; "kill": SIGKILLed; "none": nothing was alive
    waited: int = 0
    signalled_at: int | None = None  # epoch seconds on the instance's clock
    saved: tuple[str, ...] = ()  # checkpoint names written after the signal


def parse_stop(stdout: str) -> StopResult | None:
    match = _RESULT.search(stdout)
    if match is None:
        return None
    how, waited, at = match.groups()
    saved = tuple(name.rstrip("\r") for name in _SAVED.findall(stdout))
    return StopResult(how, int(waited or 0), int(at) if at else None, saved)
