"""Run events: the wrapper tells the bot, at once, that its training exited, and at most
every few seconds what its progress file says. A signed POST to the web process's
`/runctl/events`; polling stays the fallback, so a lost event costs only time.

The key is a per-run HMAC key issued at launch (workers/state/event_keys.py). It lives
in a shell variable of the wrapper (never exported, so the training does not inherit it)
and reaches the signer on its stdin through `printf`, a dash builtin: it is never on a
command line that `ps` shows. The signer is the run's own interpreter, the one program
runctl already needs on the instance (openssl would take the key as an argument).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

from workers.remote.shell import interpreter

q = shlex.quote
# Every number in an event is finite and at most this in size: the web process refuses an
# event with another (bot/events.py), the sender drops them from the progress it forwards.
NUMBER_LIMIT = 1e15

# X-Runctl-Signature: v1=<hex HMAC-SHA256 of b"v1:" + body>. An event carries the progress
# file's first 4096 bytes; one POST waits at most 5 s, and the exit event tries three times.
_KEY = re.compile(r"[0-9a-f]{64}")

# argv: url run_id kind run_dir; stdin: the key. Prints nothing; every failure is silent
# (polling reports the run anyway). A fresh timestamp and nonce per attempt.
_PY_SEND = """import hashlib, hmac, json, os, secrets, sys, time, urllib.error, urllib.request
key = sys.stdin.readline().strip().encode()
url, run_id, kind, run_dir = sys.argv[1:5]
def bounded(value):
    return value if abs(value) <= LIMIT else None
def read(name, limit):
    try:
        with open(os.path.join(run_dir, name), "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
for attempt in range(3 if kind == "exit" else 1):
    event = {"run_id": run_id, "kind": kind, "ts": int(time.time()), "nonce": secrets.token_hex(16)}
    text = read("progress.json", 4096)
    try:
        progress = json.loads(
            text, parse_int=lambda s: bounded(int(s)), parse_float=lambda s: bounded(float(s)),
            parse_constant=lambda s: None,
        ) if text else None
    except ValueError:
        progress = None
    if isinstance(progress, dict):
        event["progress"] = progress
    code = (read("exit_code", 16) or "").strip()
    if kind == "exit" and code.lstrip("-").isdigit():
        event["exit_code"] = int(code)
    body = json.dumps(event, separators=(",", ":")).encode()
    sig = "v1=" + hmac.new(key, b"v1:" + body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Runctl-Run": run_id, "X-Runctl-Signature": sig}
    try:
        urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=5).read()
        break
    except urllib.error.HTTPError as e:
        if e.code < 500 and e.code != 429:
            break
    except OSError:
        pass
    time.sleep(1 + attempt)
""".replace("import hashlib", f"LIMIT = {NUMBER_LIMIT!r}\nimport hashlib", 1)


def loads(text: bytes | str) -> Any:
    """JSON whose every number is finite and within NUMBER_LIMIT; ValueError otherwise
    (Infinity, NaN, 1e400, a 4,000-digit integer)."""
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)


def _int(text: str) -> int:
    value = int(text)
    if abs(value) > NUMBER_LIMIT:
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > NUMBER_LIMIT:
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _constant(text: str) -> Any:
    raise ValueError(f"not a number: {text}")


@dataclass(frozen=True)
class Sender:
    """Shell for the wrapper: `setup` before the training starts, `started` once `$child`
    is its pid, `ended` after `exit_code` is written."""

    setup: str = ""
    started: str = ""
    ended: str = ""


OFF = Sender()


def sender(url: str, key: str, run_id: str, python: str, every_seconds: int) -> Sender:
    """The wrapper's event shell for run_id (the wrapper defines RUN_DIR and `$child`)."""
    if not _KEY.fullmatch(key):
        raise ValueError("an event key is 64 hex digits")
    setup = (
        f"EV_URL={q(url)}\n"
        f"EV_RUN={q(run_id)}\n"
        f"EV_KEY={key}\n"  # not exported: the training's environment never holds it
        f"EV_PY={interpreter(python)}\n"
        f"EV_EVERY={int(every_seconds)}\n"
        f"EV_CODE={q(_PY_SEND)}\n"
        "runctl_event() {\n"
        '  printf \'%s\\n\' "$EV_KEY" | "$EV_PY" -c "$EV_CODE" "$EV_URL" "$EV_RUN" "$1" "$RUN_DIR" '
        ">/dev/null 2>&1 || :\n"
        "}\n"
        # A progress event when the file changed and EV_EVERY s have passed since the last.
        "runctl_watch() {\n"
        "  last=0; seen=\n"
        '  while kill -0 "$child" 2>/dev/null; do\n'
        "    sleep 1\n"
        '    m=$(date -r "$RUN_DIR/progress.json" +%s 2>/dev/null) || continue\n'
        "    now=$(date +%s)\n"
        '    if [ "$m" != "$seen" ] && [ $((now - last)) -ge "$EV_EVERY" ]; then\n'
        "      seen=$m; last=$now; runctl_event progress\n"
        "    fi\n"
        "  done\n"
        "}\n"
    )
    started = "runctl_watch </dev/null >/dev/null 2>&1 &\nev_watch=$!\n"
    ended = 'kill "$ev_watch" 2>/dev/null || :\nrunctl_event exit\n'
    return Sender(setup=setup, started=started, ended=ended)
