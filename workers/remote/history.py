"""The run's progress history: the wrapper appends `progress.json` to `progress_history.jsonl`
whenever it changed, so the end of a run (workers/remote/summary.py) can draw its whole curve
without the bot keeping every point."""

from __future__ import annotations

HISTORY = "progress_history.jsonl"

HISTORY_SECONDS = 5
HISTORY_DOUBLE_EVERY = 5000  # samples: then the interval doubles, so a week-long run stays small


def sampler(seconds: int = HISTORY_SECONDS) -> str:
    """Wrapper shell (after `child=$!`): while the training lives, append `progress.json` to
    `progress_history.jsonl` whenever it changed, so the end can draw the run's whole curve
    without the bot keeping every point. Its first 4 KiB, one line; the parser trusts none of it."""
    return (
        "( iv=" + str(int(seconds)) + "; n=0; last=''\n"
        '  while kill -0 "$child" 2>/dev/null; do\n'
        '    if [ -f "$RUN_DIR/progress.json" ]; then\n'
        "      cur=$(head -c 4096 \"$RUN_DIR/progress.json\" 2>/dev/null | tr -d '\\r\\n')\n"
        '      if [ -n "$cur" ] && [ "$cur" != "$last" ]; then\n'
        f'        printf \'%s\\n\' "$cur" >> "$RUN_DIR/{HISTORY}"; last=$cur; n=$((n + 1))\n'
        f"        if [ $((n % {HISTORY_DOUBLE_EVERY})) -eq 0 ]; then iv=$((iv * 2)); fi\n"
        "      fi\n"
        "    fi\n"
        '    sleep "$iv"\n'
        "  done ) </dev/null >/dev/null 2>&1 &\n"
    )
