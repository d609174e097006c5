"""What an instance says about its runs, for the reconcile: one script for a whole batch
of instances, and the parser of its output.

Each run directory with a ``meta.json`` (written and signed at launch) is reported unless its end
was already reported (``exit_code`` and the ``reported`` marker both there). The script
first marks as reported the runs Redis has seen end, so later passes skip them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from workers.remote import bounds, frame
from workers.remote.shell import SECTION, header, q

META_CHARS = 1500

Seen = Literal["live", "ended", "vanished", "starting"]


def runs_report(root: str, reported: Sequence[str]) -> str:
    """Mark ``reported`` run ids, then print one ``run`` line (and its ``meta``, encoded:
    frame.py) per run whose end has not been reported: ``run <id> live|vanished|starting`` or
    ``run <id> ended <exit code> <when, epoch s>``. A directory not named like a run id is skipped."""
    s = SECTION
    mark = ""
    if reported:
        ids = " ".join(q(r) for r in reported)
        mark = (
            f"for RUN_ID in {ids}; do\n"
            '  if [ -d "$RUNCTL_ROOT/runs/$RUN_ID" ]; then : > "$RUNCTL_ROOT/runs/$RUN_ID/reported"; fi\n'
            "done\n"
        )
    return (
        header(root)
        + frame.ENC
        + (
            f'echo "{s}now $(date +%s)"\n' + mark + 'for d in "$RUNCTL_ROOT"/runs/*/; do\n'
            '  [ -f "$d/meta.json" ] || continue\n'
            '  if [ -f "$d/exit_code" ] && [ -f "$d/reported" ]; then continue; fi\n'
            '  rid=$(basename "$d")\n'
            '  case "$rid" in ""|.|..|*[!A-Za-z0-9_.-]*) continue ;; esac\n'
            '  pid=$(cat "$d/pid" 2>/dev/null || true)\n'
            "  alive=0\n"
            '  case "$pid" in ""|*[!0-9]*) ;; *) if kill -0 "$pid" 2>/dev/null; then alive=1; fi ;; esac\n'
            "  wrapper=0\n"
            '  pgid=$(cat "$d/pgid" 2>/dev/null || true)\n'
            '  case "$pgid" in ""|*[!0-9]*) ;; *) if kill -0 "$pgid" 2>/dev/null; then wrapper=1; fi ;; esac\n'
            '  if [ -f "$d/exit_code" ]; then\n'
            "    code=$(head -c 20 \"$d/exit_code\" | tr -cd '0-9-')\n"
            '    seen="ended ${code:-x} $(date -r "$d/exit_code" +%s)"\n'
            '  elif [ "$alive" = 1 ]; then seen=live\n'
            '  elif [ -n "$pid" ] && [ "$wrapper" = 0 ]; then seen=vanished\n'
            "  else seen=starting\n"
            "  fi\n"
            f'  printf \'{s}run %s %s\\n\' "$rid" "$seen"\n'
            f'  printf \'{s}meta %s\\n\' "$(head -c {META_CHARS} "$d/meta.json" | enc)"\n'
            "done\n"
        )
    )


@dataclass
class SeenRun:
    run_id: str
    seen: Seen
    exit_code: int | None = None
    ended_at: datetime | None = None
    meta: str | None = None  # meta.json as printed: the instance's claim until verified (workers/state/records.py)


@dataclass
class Report:
    now: datetime | None = None
    runs: list[SeenRun] = field(default_factory=list)

    def get(self, run_id: str) -> SeenRun | None:
        return next((r for r in self.runs if r.run_id == run_id), None)


def parse_report(output: str) -> Report:
    report = Report()
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        if word == "now":
            report.now = bounds.instant(rest)
        elif word == "run":
            parts = rest.split()
            if len(parts) < 2 or parts[1] not in ("live", "ended", "vanished", "starting"):
                continue
            run = SeenRun(run_id=parts[0], seen=parts[1])  # type: ignore[arg-type]
            if run.seen == "ended" and len(parts) == 4:
                run.exit_code = _int(parts[2])
                run.ended_at = bounds.instant(parts[3])
            report.runs.append(run)
        elif word == "meta" and report.runs and report.runs[-1].meta is None:
            report.runs[-1].meta = frame.text(rest.strip()) or ""  # verified by the reconcile job
    return report


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
