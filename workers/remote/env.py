"""The environment script: reuse or build the run's virtualenv at
``$RUNCTL_ROOT/envs/<digest16>-py<X.Y>``, log to the run's ``setup.log``, prune old ones.

Output lines (after ``SECTION``): ``env <name>``, then ``reused <built-epoch>`` or
``built <built-epoch> <installer>`` and any ``pruned <name>`` (encoded: frame.py); on failure
``failed <reason>`` and ``tail <the last lines of setup.log, encoded>``.
Exit codes: 40 install failed, 41 no venv, 42 no python3, 43 another build held the env too long.
"""

from __future__ import annotations

from workers.remote import frame
from workers.remote.shell import SECTION, header, heredoc_end, home, q, run_dir

KEEP_ENVS = 3  # environments used by this many most recent runs survive a prune
LOG_TAIL = 30
LOCK_WAIT_SECONDS = 1800

INSTALL_FAILED, NO_VENV, NO_PYTHON, LOCK_TIMEOUT = 40, 41, 42, 43


def setup_env(
    root: str,
    run_id: str,
    digest: str,
    workdir: str,
    requirements: str,
    generated: str | None,
    rebuild: bool = False,
    keep: int = KEEP_ENVS,
    python: str = "python3",
) -> str:
    """``requirements`` is the file's path in the code tree; when ``generated`` is
    given (dependencies from pyproject.toml) it is written to the run directory
    and installed instead. The environment is built from ``python`` and sees its
    site packages (``--system-site-packages``), so an image's torch is not reinstalled."""
    s = SECTION
    if generated is not None:
        text = generated if generated.endswith("\n") else generated + "\n"
        eof = heredoc_end(text)
        req = 'REQ="$RUN_DIR/requirements.txt"\n'
        write_req = f"cat > \"$REQ\" <<'{eof}'\n{text}{eof}\n"
    else:
        req = f'REQ="$RUNCTL_ROOT/code/"{q(requirements)}\n'
        write_req = ""
    work = f'WORK="$RUNCTL_ROOT/code/"{q(workdir)}\n' if workdir else 'WORK="$RUNCTL_ROOT/code"\n'
    tail = f'echo "{s}tail $(tail -n {LOG_TAIL} "$LOG" | cut -c1-300 | enc)"'
    return (
        header(root)
        + frame.ENC
        + (
            f"RUN_DIR={run_dir(run_id)}\n"
            'LOG="$RUN_DIR/setup.log"\n'
            f"{req}{work}"
            f"REQ_NAME={q(requirements)}\n"
            f"PYTHON={q(python)}\n"
            'mkdir -p "$RUN_DIR" "$RUNCTL_ROOT/envs"\n'
            f"{write_req}"
            'if ! command -v "$PYTHON" >/dev/null 2>&1; then\n'
            f'  echo "{s}failed no-python"; exit {NO_PYTHON}\n'
            "fi\n"
            "PYVER=$(\"$PYTHON\" -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' | tr -cd '0-9.')\n"
            f'NAME={q(digest[:16])}-py"$PYVER"\n'
            'ENV="$RUNCTL_ROOT/envs/$NAME"\n'
            'LOCK="$ENV.lock"\n'
            f'echo "{s}env $NAME"\n'
            # The train lock already serialises runs on an instance; this directory
            # lock keeps two builders of one env apart even without it.
            "waited=0\n"
            'while ! mkdir "$LOCK" 2>/dev/null; do\n'
            '  holder=$(cat "$LOCK/pid" 2>/dev/null || true)\n'
            '  case "$holder" in\n'
            '    ""|*[!0-9]*) ;;\n'
            '    *) if ! kill -0 "$holder" 2>/dev/null; then rm -rf "$LOCK"; continue; fi ;;\n'
            "  esac\n"
            f'  if [ "$waited" -ge {LOCK_WAIT_SECONDS} ]; then echo "{s}failed locked"; exit {LOCK_TIMEOUT}; fi\n'
            "  sleep 2; waited=$((waited + 2))\n"
            "done\n"
            'echo $$ > "$LOCK/pid"\n'
            "trap 'rm -rf \"$LOCK\"' EXIT\n"
            f"REBUILD={1 if rebuild else 0}\n"
            'if [ "$REBUILD" = 0 ] && [ -f "$ENV/.runctl-ready" ]; then\n'
            "  built=$(head -c 20 \"$ENV/.runctl-ready\" | tr -cd '0-9')\n"
            '  echo "runctl: reusing environment $NAME (built $(date -u -d "@$built" 2>/dev/null || echo "$built"))" > "$LOG"\n'
            '  printf \'%s\\n\' "$NAME" > "$RUN_DIR/env"\n'
            f'  echo "{s}reused $built"\n'
            "  exit 0\n"
            "fi\n"
            'rm -rf "$ENV"\n'
            'printf \'runctl: building environment %s from %s\\n\' "$NAME" "$REQ_NAME" > "$LOG"\n'
            # ensurepip alone takes 10-20 s; uv or a recent system pip can install
            # into a pip-less venv instead.
            # The agent's PATH lacks ~/.local/bin and ~/.cargo/bin, where uv's installer puts it.
            + home()
            + "UV=$(command -v uv 2>/dev/null || true)\n"
            'for c in "$RUNCTL_ROOT/bin/uv" "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do\n'
            '  [ -z "$UV" ] && [ -x "$c" ] && UV=$c\n'
            "done\n"
            'export PIP_CACHE_DIR="$RUNCTL_ROOT/cache/pip" UV_CACHE_DIR="$RUNCTL_ROOT/cache/uv"\n'
            'if [ -n "$UV" ]; then\n'
            "  INSTALLER=uv; WITH_PIP=--without-pip\n"
            'elif "$PYTHON" -c \'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 3))\' 2>/dev/null; then\n'
            "  INSTALLER=system-pip; WITH_PIP=--without-pip\n"
            "else\n"
            "  INSTALLER=pip; WITH_PIP=\n"
            "fi\n"
            'printf \'runctl: python %s (%s), installer %s\\n\' "$PYVER" "$PYTHON" "$INSTALLER" >> "$LOG"\n'
            'if ! "$PYTHON" -m venv --system-site-packages $WITH_PIP "$ENV" >> "$LOG" 2>&1; then\n'
            '  rm -rf "$ENV"\n'
            f'  echo "{s}failed venv"; {tail}; exit {NO_VENV}\n'
            "fi\n"
            f'cd "$WORK" || exit {INSTALL_FAILED}\n'
            'case "$INSTALLER" in\n'
            '  uv) "$UV" pip install --python "$ENV/bin/python" -r "$REQ" ;;\n'
            '  system-pip) "$PYTHON" -m pip --python "$ENV/bin/python" install --progress-bar off -r "$REQ" ;;\n'
            '  *) "$ENV/bin/python" -m pip install --progress-bar off -r "$REQ" ;;\n'
            'esac >> "$LOG" 2>&1\n'
            "rc=$?\n"
            'if [ "$rc" -ne 0 ]; then\n'
            '  echo "runctl: install failed (exit $rc); removed the half-built environment" >> "$LOG"\n'
            '  rm -rf "$ENV"\n'
            f'  echo "{s}failed install"; {tail}; exit {INSTALL_FAILED}\n'
            "fi\n"
            'date +%s > "$ENV/.runctl-ready"\n'
            'printf \'%s\\n\' "$NAME" > "$RUN_DIR/env"\n'
            'echo "runctl: environment $NAME ready" >> "$LOG"\n'
            f'echo "{s}built $(head -c 20 "$ENV/.runctl-ready" | tr -cd \'0-9\') $INSTALLER"\n' + prune(keep)
        )
    )


def prune(keep: int) -> str:
    """Remove environments no recent run used; one being built (locked) is left alone."""
    s = SECTION
    return (
        f'recent=$(ls -t "$RUNCTL_ROOT"/runs/*/env 2>/dev/null | head -n {int(keep)} | while read -r f; do cat "$f"; done)\n'
        'for d in "$RUNCTL_ROOT"/envs/*; do\n'
        '  [ -d "$d" ] || continue\n'
        '  n=$(basename "$d")\n'
        '  case "$n" in *.lock) continue ;; esac\n'
        '  [ "$n" = "$NAME" ] && continue\n'
        '  [ -d "$d.lock" ] && continue\n'
        '  if ! printf \'%s\\n\' "$recent" | grep -qxF "$n"; then\n'
        '    rm -rf "$d"\n'
        f'    echo "{s}pruned $(enc_word "$n")"\n'
        "  fi\n"
        "done\n"
    )
