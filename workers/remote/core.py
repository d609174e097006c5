"""Run scripts: launch, probe, status and stop of a training run.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line), and every value that came from a user through ``shlex.quote``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from workers.remote import frame, gpu, history, spot
from workers.remote.events import OFF, Sender
from workers.remote.shell import SECTION, header, heredoc_end, home, interpreter, q, run_dir

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def work_dir(run_id: str) -> str:
    """Where a run works: its own copy of the shipped tree, so what it writes relative to
    its working directory belongs to the run and no later sync replaces it."""
    return f"{run_dir(run_id)}/work"


BUSY_EXIT = 75  # `deliver` found another live training and changed nothing


# SIGTERM is signal 15 on Linux: bit 14 of /proc/<pid>/status' SigCgt (caught) and SigIgn
# (ignored) masks, in hexadecimal (proc(5), https://man7.org/linux/man-pages/man5/proc.5.html).
# The last 4 hex digits hold it, which keeps dash's arithmetic clear of 64-bit overflow.
_SIGTERM_DISPOSITION = (
    "    cgt=$(sed -n 's/^SigCgt:[[:space:]]*//p' \"/proc/$pid/status\" 2>/dev/null || true)\n"
    "    ign=$(sed -n 's/^SigIgn:[[:space:]]*//p' \"/proc/$pid/status\" 2>/dev/null || true)\n"
    '    c=${cgt#"${cgt%????}"}; i=${ign#"${ign%????}"}\n'
    '    case "$c$i" in ""|*[!0-9a-fA-F]*) continue ;; esac\n'
    "    [ ${#c} -eq 4 ] && [ ${#i} -eq 4 ] || continue\n"
    "    if [ $((0x$c & 16384)) -ne 0 ]; then how=caught\n"
    "    elif [ $((0x$i & 16384)) -ne 0 ]; then how=ignored\n"
    "    else how=default; fi\n"
    '    printf \'sigterm %s %s\\n\' "$rid" "$how"\n'
)


def _probe_body(sigterm: bool = False) -> str:
    return (
        'for d in "$RUNCTL_ROOT"/runs/*/; do\n'
        '  [ -f "$d/pid" ] || continue\n'
        '  [ -f "$d/exit_code" ] && continue\n'
        '  pid=$(cat "$d/pid" 2>/dev/null) || continue\n'
        '  case "$pid" in ""|*[!0-9]*) continue ;; esac\n'
        '  rid=$(basename "$d")\n'
        # A run id is runctl's: a directory named otherwise is not a run, and prints nothing.
        '  case "$rid" in ""|.|..|*[!A-Za-z0-9_.-]*) continue ;; esac\n'
        '  if kill -0 "$pid" 2>/dev/null; then\n'
        '    printf \'live %s %s\\n\' "$rid" "$pid"\n' + (_SIGTERM_DISPOSITION if sigterm else "") + "  fi\n"
        "done\n"
    )


def probe_live_runs(root: str, sigterm: bool = False) -> str:
    """Print `live <run-id> <pid>` for every run whose training process is alive; with
    `sigterm`, also `sigterm <run-id> <caught|ignored|default>`: what the training process
    does with SIGTERM (nothing printed where /proc does not tell)."""
    return header(root) + _probe_body(sigterm)


def parse_sigterm(stdout: str) -> dict[str, str]:
    """`probe_live_runs(..., sigterm=True)`'s answer: run id -> caught, ignored or default."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "sigterm" and parts[2] in ("caught", "ignored", "default"):
            found[parts[1]] = parts[2]
    return found


def wrapper(
    run_id: str,
    script: str,
    args: Sequence[str],
    env: Mapping[str, str],
    python: str = "python3",
    checkpoint_run_id: str | None = None,
    events: Sender = OFF,
    pass_checkpoint_dir: bool = False,
    spot_watch: bool = False,
    launcher: Sequence[str] = (),
) -> str:
    """The detached wrapper: runs the training as a child so `pid` is the training
    process itself, and records its exit code when it ends (then sends the run's
    `events`, workers/remote/events.py). It works in the work directory of the run that
    owns its checkpoints (a resumed run continues in its predecessor's).
    `pass_checkpoint_dir` adds `--checkpoint-dir "$RUNCTL_CHECKPOINT_DIR"`."""
    bad = [k for k in env if not _ENV_NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"not environment variable names: {bad!r}")
    exports = "".join(f"export {k}={q(v)}\n" for k, v in env.items())
    words = [interpreter(python), *(q(a) for a in ("-u", *launcher, script, *args))]
    if pass_checkpoint_dir:
        words += ["--checkpoint-dir", '"$RUNCTL_CHECKPOINT_DIR"']
    argv = " ".join(words)
    rdir = run_dir(run_id)
    owner = checkpoint_run_id or run_id
    return (
        f"RUN_DIR={rdir}\n"
        f'cd {work_dir(owner)} || {{ echo 127 > "$RUN_DIR/exit_code"; exit 127; }}\n'
        + home()
        + 'export RUNCTL_RUN_DIR="$RUN_DIR"\n'
        'export RUNCTL_PROGRESS_FILE="$RUN_DIR/progress.json"\n'
        f"export RUNCTL_CHECKPOINT_DIR={run_dir(owner)}/checkpoints\n"
        f"{exports}"
        'mkdir -p "$RUNCTL_CHECKPOINT_DIR"\n'
        'printf \'%s\\n\' "$RUNCTL_CHECKPOINT_DIR" > "$RUN_DIR/checkpoint_dir"\n'
        'echo $$ > "$RUN_DIR/pgid"\n'
        # A caught trap resets to default in the child, so the training keeps
        # default signal handling while this shell survives to record the exit.
        "trap ':' TERM INT HUP\n" + events.setup + f'{argv} </dev/null >>"$RUN_DIR/training.log" 2>&1 &\n'
        "child=$!\n"
        'echo "$child" > "$RUN_DIR/pid.tmp" && mv "$RUN_DIR/pid.tmp" "$RUN_DIR/pid"\n'
        + events.started
        + history.sampler()
        + (spot.watch() if spot_watch else "")
        + "while :; do\n"
        '  wait "$child"; rc=$?\n'
        '  kill -0 "$child" 2>/dev/null || break\n'
        "done\n"
        + (spot.unwatch() if spot_watch else "")
        + 'echo "$rc" > "$RUN_DIR/exit_code.tmp" && mv "$RUN_DIR/exit_code.tmp" "$RUN_DIR/exit_code"\n'
        + events.ended
    )


DOWNLOAD_FAILED, UNPACK_FAILED, COPY_FAILED = 20, 21, 23

# urllib follows redirects; it prints the final HTTP status (0: no answer) for the shell.
_PY_FETCH = """import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=120); code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except OSError as e:
    code, body = 0, str(e).encode()
open(sys.argv[2], "wb").write(body); print(code)
"""


def fetch_code(bundle_url: str, run_id: str) -> str:
    """Download (following redirects) and unpack a bundle into $RUNCTL_ROOT/code, swapped
    in atomically. A failure says which step failed, the HTTP status and the body's first bytes."""
    tmp = f'"$RUNCTL_ROOT/code.tmp."{q(run_id)}'
    first_bytes = "head -c 200 \"$BUNDLE\" 2>/dev/null | tr -c '[:print:]' '.'"
    return (
        f"BUNDLE_URL={q(bundle_url)}\n"
        f"TMP={tmp}\n"
        'BUNDLE="$TMP.tar.gz"\n'
        'rm -rf "$TMP" "$BUNDLE" && mkdir -p "$TMP"\n'
        "status=\n"
        "if command -v curl >/dev/null 2>&1; then\n"
        '  status=$(curl -sSL --retry 3 -o "$BUNDLE" -w \'%{http_code}\' "$BUNDLE_URL") || :\n'
        "elif command -v wget >/dev/null 2>&1; then\n"
        '  status=$(wget -S --content-on-error -O "$BUNDLE" "$BUNDLE_URL" 2>&1 '
        "| sed -n 's/^ *HTTP\\/[0-9.]* \\([0-9][0-9][0-9]\\).*/\\1/p' | tail -n 1) || :\n"
        "else\n"
        f'  status=$(python3 -c {q(_PY_FETCH)} "$BUNDLE_URL" "$BUNDLE") || :\n'
        "fi\n"
        'if [ "$status" != 200 ]; then\n'
        "  printf 'runctl: could not download the code bundle (HTTP %s); the response began: %s\\n' "
        f'"${{status:-none}}" "$({first_bytes})" >&2\n'
        '  rm -rf "$TMP" "$BUNDLE"\n'
        f"  exit {DOWNLOAD_FAILED}\n"
        "fi\n"
        'if ! tar -xzf "$BUNDLE" -C "$TMP" 2>"$TMP.err"; then\n'
        "  printf 'runctl: could not unpack the code bundle (HTTP %s, %s bytes): %s; it began: %s\\n' "
        '"$status" "$(wc -c < "$BUNDLE" | tr -d \' \')" "$(head -c 200 "$TMP.err" | tr -c \'[:print:]\' \' \')" '
        f'"$({first_bytes})" >&2\n'
        '  rm -rf "$TMP" "$TMP.err" "$BUNDLE"\n'
        f"  exit {UNPACK_FAILED}\n"
        "fi\n"
        'rm -f "$BUNDLE" "$TMP.err"\n'
        'rm -rf "$RUNCTL_ROOT/code.old"\n'
        'if [ -d "$RUNCTL_ROOT/code" ]; then mv "$RUNCTL_ROOT/code" "$RUNCTL_ROOT/code.old"; fi\n'
        'mv "$TMP" "$RUNCTL_ROOT/code"\n'
        'rm -rf "$RUNCTL_ROOT/code.old"\n'
    )


def _sync_body(run_id: str, script: str, bundle_url: str | None) -> str:
    return (
        f"RUN_DIR={run_dir(run_id)}\n"
        + 'mkdir -p "$RUN_DIR" "$RUNCTL_ROOT/runs"\n'
        + (fetch_code(bundle_url, run_id) if bundle_url else "")
        + f"SCRIPT={q(script)}\n"
        + 'if [ ! -f "$RUNCTL_ROOT/code/$SCRIPT" ]; then\n'
        + '  printf \'runctl: script %s is not in %s/code on this instance\\n\' "$SCRIPT" "$RUNCTL_ROOT" >&2\n'
        + "  exit 3\n"
        + "fi\n"
        + "echo synced\n"
    )


def deliver(root: str, run_id: str, script: str, bundle_url: str | None, then: str = "") -> str:
    """One command for the usual train: refuse (exit BUSY_EXIT, `live` lines) if another
    training is alive, else ship the code and run ``then`` (a ``launch_body``)."""
    return (
        header(root)
        + "live=$(\n"
        + _probe_body()
        + ")\n"
        + f"RUN_ID={q(run_id)}\n"
        # Lines of other runs only; the run id is compared as a value, never read as a pattern.
        + "live=$(printf '%s\\n' \"$live\" | while read -r word rid pid; do\n"
        + '  if [ "$word" = live ] && [ "$rid" != "$RUN_ID" ]; then printf \'live %s %s\\n\' "$rid" "$pid"; fi\n'
        + "done)\n"
        + f'if [ -n "$live" ]; then printf \'%s\\n\' "$live"; exit {BUSY_EXIT}; fi\n'
        + _sync_body(run_id, script, bundle_url)
        + then
    )


def launch_body(
    run_id: str,
    script: str,
    args: Sequence[str],
    env: Mapping[str, str],
    meta_json: str,
    python: str = "python3",
    checkpoint_run_id: str | None = None,
    events: Sender = OFF,
    pass_checkpoint_dir: bool = False,
    checkpoint_dirs: Sequence[str] = (),
    spot_watch: bool = False,
    launcher: Sequence[str] = (),
) -> str:
    """Start the wrapper detached (the code is already in place); ends once it runs.

    The shipped tree is copied into the run's work directory first (over what a resumed
    run's predecessor left there: shipped files are refreshed, the run's own are kept).
    `checkpoint_dirs` (the script's `--checkpoint-dir`/`--output-dir` values) are recorded
    beside the checkpoints, so discovery looks there too."""
    body = wrapper(
        run_id, script, args, env, python, checkpoint_run_id, events, pass_checkpoint_dir, spot_watch, launcher
    )
    eof = heredoc_end(body)
    owner = checkpoint_run_id or run_id
    record = "".join(
        f"printf '%s\\n' {q(d)} >> \"$OWNER_DIR/checkpoint_dirs\"\n" for d in checkpoint_dirs if "\n" not in d
    )
    return (
        f"RUN_DIR={run_dir(run_id)}\n"
        + f"OWNER_DIR={run_dir(owner)}\n"
        + 'mkdir -p "$RUN_DIR" "$OWNER_DIR/work"\n'
        + 'if ! cp -R "$RUNCTL_ROOT/code/." "$OWNER_DIR/work/"; then\n'
        + "  printf 'runctl: could not copy the code into the run directory %s\\n' \"$OWNER_DIR/work\" >&2\n"
        + f"  exit {COPY_FAILED}\n"
        + "fi\n"
        + record
        + f"META={q(meta_json)}\n"
        + 'printf \'%s\\n\' "$META" > "$RUN_DIR/meta.json"\n'
        # Private: with events on, run.sh holds the run's event key.
        + f"(umask 077 && cat > \"$RUN_DIR/run.sh\") <<'{eof}'\n{body}{eof}\n"
        + ': > "$RUN_DIR/training.log"\n'
        + 'setsid sh "$RUN_DIR/run.sh" </dev/null >/dev/null 2>&1 &\n'
        # Return only once the detached wrapper is in its own session, so the
        # agent's process-group kill at the end of this command cannot reach it.
        + "n=0\n"
        + 'while [ ! -f "$RUN_DIR/pid" ] && [ ! -f "$RUN_DIR/exit_code" ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done\n'
        + 'if [ ! -f "$RUN_DIR/pid" ] && [ ! -f "$RUN_DIR/exit_code" ]; then echo "runctl: the training process did not start" >&2; exit 4; fi\n'
        + "echo launched\n"
    )


def runs_status(root: str, run_ids: Sequence[str], log_lines: int = 15, line_chars: int = 300) -> str:
    """Snapshots of several runs in one script, so one SSM command can serve many
    instances; each instance reports the runs it has, each after `::runctl::run <id>`.
    What the instance wrote (progress, names, log, notice, nvidia-smi) is encoded (frame.py)."""
    s = SECTION
    ids = " ".join(q(r) for r in run_ids)
    return (
        header(root)
        + frame.ENC
        + (
            'echo "' + s + 'now $(date +%s)"\n' + gpu.report() + f"for RUN_ID in {ids}; do\n"
            'RUN_DIR="$RUNCTL_ROOT/runs/$RUN_ID"\n'
            '[ -d "$RUN_DIR" ] || continue\n'
            'echo "' + s + 'run $RUN_ID"\n'
            'pid=$(cat "$RUN_DIR/pid" 2>/dev/null || true)\n'
            'case "$pid" in ""|*[!0-9]*) alive=0 ;; *) if kill -0 "$pid" 2>/dev/null; then alive=1; else alive=0; fi ;; esac\n'
            'echo "' + s + 'alive $alive"\n'
            'if [ -n "$pid" ]; then echo "' + s + 'pid 1"; fi\n'
            'pgid=$(cat "$RUN_DIR/pgid" 2>/dev/null || true)\n'
            'case "$pgid" in ""|*[!0-9]*) ;; *) if kill -0 "$pgid" 2>/dev/null; then echo "'
            + s
            + 'wrapper 1"; fi ;; esac\n'
            'if [ -f "$RUN_DIR/exit_code" ]; then echo "'
            + s
            + 'exit $(head -c 20 "$RUN_DIR/exit_code" | tr -cd \'0-9-\')"; fi\n'
            + spot.report(s)
            + 'if [ -f "$RUN_DIR/progress.json" ]; then\n'
            '  echo "' + s + 'progress $(head -c 1500 "$RUN_DIR/progress.json" | enc)"\n'
            "fi\n"
            'ck=$(cat "$RUN_DIR/checkpoint_dir" 2>/dev/null || echo "$RUN_DIR/checkpoints")\n'
            'if [ -d "$ck" ]; then\n'
            "  newest=$(ls -t \"$ck\" 2>/dev/null | grep -v -e '^manifest.json$' -e '^completed.json$' -e '^\\.' | head -n 1)\n"
            '  if [ -n "$newest" ] && [ -e "$ck/$newest" ]; then\n'
            '    echo "'
            + s
            + 'checkpoint $(wc -c < "$ck/$newest" | tr -cd \'0-9\') $(date -r "$ck/$newest" +%s | tr -cd \'0-9\') $(enc_word "$newest")"\n'
            "  fi\n"
            "fi\n"
            f'echo "{s}log $(tail -n {int(log_lines)} "$RUN_DIR/training.log" 2>/dev/null | cut -c1-{int(line_chars)} | enc)"\n'
            'echo "' + s + 'end"\n'
            "done\n"
        )
    )
