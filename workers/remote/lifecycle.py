"""Lifecycle scripts: stop a training run before its instance is stopped or terminated.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line), and every value that came from a user through ``shlex.quote``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from workers.remote import bounds, frame
from workers.remote.shell import header, run_dir

_RESULT = re.compile(r"^stopped (term|kill|none)(?: (\d+))?(?: (\d+))?\s*$", re.MULTILINE)
_SAVED = re.compile(r"^saved (\S+)$", re.MULTILINE)
_JSON_LINE = re.compile(r"^(progress|marker) (\S+)$", re.MULTILINE)
StopHow = Literal["term", "kill", "none"]


def stop_run(root: str, run_id: str, grace: int, force: bool = False, checkpoint_run_id: str | None = None) -> str:
    """SIGTERM the run's process group, wait up to `grace` seconds, then SIGKILL it.

    `force` sends SIGKILL straight away. Prints ``saved <name>`` for each checkpoint
    written after the signal (in the directory of `checkpoint_run_id`, default the run's
    own), then ``stopped <term|kill|none> <waited-seconds> <signal-epoch-seconds>``
    (``stopped none`` when nothing was alive); ``parse_stop`` reads them. Before the
    signal it prints ``progress <progress.json>``, after the exit ``marker <completed.json>``
    (when the script wrote one since): they tell which epoch had finished. Names and
    file contents are encoded (workers/remote/frame.py): the training cannot forge a line.
    """
    first = "KILL" if force else "TERM"
    return (
        header(root)
        + frame.ENC
        + (
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
            "if [ -f \"$RUN_DIR/progress.json\" ]; then printf 'progress %s\\n' "
            '"$(head -c 2000 "$RUN_DIR/progress.json" | enc)"; fi\n'
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
            '    printf \'saved %s\\n\' "$(enc_word "${f##*/}")"\n'
            "  done\n"
            "fi\n"
            'if [ -n "$(find "$CK_DIR/completed.json" -newer "$RUN_DIR/stop_requested" 2>/dev/null)" ]; then\n'
            '  printf \'marker %s\\n\' "$(head -c 2000 "$CK_DIR/completed.json" | enc)"\n'
            "fi\n"
            'echo "stopped $how $waited $signalled"\n'
        )
    )


@dataclass(frozen=True)
class StopResult:
    how: StopHow  # "term": exited after SIGTERM; "kill": SIGKILLed; "none": nothing was alive
    waited: int = 0
    signalled_at: int | None = None  # epoch seconds on the instance's clock
    saved: tuple[str, ...] = ()  # checkpoint names written after the signal
    finished_epoch: int | None = None  # the last epoch the run completed, when it said


def parse_stop(stdout: str) -> StopResult | None:
    match = _RESULT.search(stdout)
    if match is None:
        return None
    how, waited, at = match.groups()
    saved = tuple(name for token in _SAVED.findall(stdout) if (name := frame.text(token)))
    found = {kind: _object(frame.text(token) or "") for kind, token in _JSON_LINE.findall(stdout)}
    finished = _marker_epoch(found.get("marker")) if "marker" in found else _progress_epoch(found.get("progress"))
    return StopResult(how, int(waited or 0), int(at) if at else None, saved, finished)  # type: ignore[arg-type]


def _object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bounds.MAX_COUNT:
        return value
    return None


def _marker_epoch(marker: dict[str, Any] | None) -> int | None:
    """completed.json's `epoch`: the last completed epoch (training/README.md)."""
    return _count((marker or {}).get("epoch"))


def _progress_epoch(progress: dict[str, Any] | None) -> int | None:
    """Completed epochs from progress.json's global step: step // steps per epoch."""
    p = progress or {}
    step, total_steps, total_epochs = _count(p.get("step")), _count(p.get("total_steps")), _count(p.get("total_epochs"))
    if step is None or not total_steps or not total_epochs or total_steps % total_epochs:
        return None
    return step // (total_steps // total_epochs)
