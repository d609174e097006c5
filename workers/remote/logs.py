"""Reading a run's training.log on the instance: its tail (optionally the lines holding a
text), and the whole file PUT to a presigned S3 URL, since SSM returns at most 24,000
characters of output. Each is one SSM command; the parsers turn the output into facts.

Tail output, one record a line:

    ::runctl::none                     no run on the instance has a training.log
    ::runctl::nolog <run-id>           that run has no training.log (the id encoded: frame.py)
    ::runctl::run <run-id>             the run whose log this is (the id encoded: a directory's name)
    ::runctl::size <bytes>             the whole log
    ::runctl::lines <count>            its lines
    ::runctl::matches <count>          (with a grep) lines holding the text
    ::runctl::selected <bytes>         the tail asked for, before it is cut to fit
    ::runctl::b64 | ::runctl::hex      then the tail's last bytes, encoded (byte-exact: NUL,
                                       invalid UTF-8 and escape codes are the worker's to clean)
    ::runctl::end

Upload output: `::runctl::nolog`, or `::runctl::toolarge <log-bytes> <file-bytes>`, or
`::runctl::put <plain|gzip> <log-bytes> <file-bytes> <http-status> [<S3 error code>]`.
The URL is never printed; of S3's answer only its error code is.

Rules as everywhere in this package: POSIX sh, `$RUNCTL_ROOT` only, user text quoted.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from workers.remote import frame
from workers.remote.shell import SECTION, header, q, run_dir

LOG_NAME = "training.log"
# Encoded tail bytes: base64 of this many bytes, with the records, stays under SSM's 24,000.
TAIL_BYTES = 16_000
SELECT_CAP = 1_000_000  # the selection kept on the instance while counting it
GZIP_ABOVE = 4 * 1024 * 1024  # a log bigger than this is uploaded gzipped
MAX_UPLOAD = 1024**3  # Slack takes files up to 1 GB


def log_path(run_id: str) -> str:
    """The run's training.log as shell text (under its run directory)."""
    return f"{run_dir(run_id)}/{LOG_NAME}"


def _encode(source: str) -> str:
    """Print ``source``'s bytes encoded, with the marker saying how."""
    return (
        "if command -v base64 >/dev/null 2>&1; then\n"
        f'  echo "{SECTION}b64"; {source} | base64\n'
        "else\n"
        f"  echo \"{SECTION}hex\"; {source} | od -An -v -tx1 | tr -d ' \\n'; echo\n"
        "fi\n"
    )


def _find_log(run_id: str | None) -> str:
    """Set LOG and RUN_ID: the asked run's log, or the newest log on the instance."""
    if run_id:
        return (
            f"RUN_ID={q(run_id)}\n"
            f"LOG={log_path(run_id)}\n"
            f'if [ ! -f "$LOG" ]; then echo "{SECTION}nolog $(enc_word "$RUN_ID")"; exit 0; fi\n'
        )
    return (  # the newest: the log written last (the training writes it as it runs)
        f'LOG=$(ls -t "$RUNCTL_ROOT"/runs/*/{LOG_NAME} 2>/dev/null | head -n 1)\n'
        f'if [ -z "$LOG" ]; then echo "{SECTION}none"; exit 0; fi\n'
        'RUN_ID=$(basename "$(dirname "$LOG")")\n'
    )


def tail_script(root: str, run_id: str | None, lines: int, grep: str | None) -> str:
    s = SECTION
    select = f'tail -n {int(lines)} "$LOG"'
    if grep:
        select = f'grep -a -F -e "$PAT" "$LOG" | tail -n {int(lines)}'
    return (
        header(root)
        + "LC_ALL=C\nexport LC_ALL\n"
        + frame.ENC
        + _find_log(run_id)
        + (f"PAT={q(grep)}\n" if grep else "")
        + f'echo "{s}run $(enc_word "$RUN_ID")"\n'
        + f'echo "{s}size $(wc -c < "$LOG" | tr -d \' \')"\n'
        + f'echo "{s}lines $(wc -l < "$LOG" | tr -d \' \')"\n'
        + (f'echo "{s}matches $(grep -a -c -F -e "$PAT" "$LOG")"\n' if grep else "")
        + 'SEL=$(mktemp 2>/dev/null || echo "/tmp/runctl-tail.$$")\n'
        + "trap 'rm -f \"$SEL\"' EXIT\n"
        + f'{select} | tail -c {SELECT_CAP} > "$SEL"\n'
        + f'echo "{s}selected $(wc -c < "$SEL" | tr -d \' \')"\n'
        + _encode(f'tail -c {TAIL_BYTES} "$SEL"')
        + f'echo "{s}end"\n'
    )


@dataclass(frozen=True)
class LogTail:
    run_id: str | None  # None: no run on the instance has a log
    missing: bool = False  # the asked run has no training.log
    size: int = 0
    lines: int = 0
    matches: int | None = None
    selected: int = 0
    data: bytes = b""

    @property
    def cut(self) -> bool:
        """The tail asked for was bigger than what fits: its first bytes are left out."""
        return self.selected > len(self.data)


def parse_tail(output: str) -> LogTail:
    facts: dict[str, str] = {}
    encoding = ""
    body: list[str] = []
    for line in output.splitlines():
        if line.startswith(SECTION):
            word, _, rest = line[len(SECTION) :].partition(" ")
            if word in ("b64", "hex"):
                encoding = word
            elif word != "end":
                facts[word] = rest.strip()
            continue
        if encoding:
            body.append(line.strip())
    if "none" in facts:
        return LogTail(run_id=None)
    if "nolog" in facts:
        return LogTail(run_id=frame.name(facts["nolog"]), missing=True)
    return LogTail(
        run_id=frame.name(facts.get("run", "")) or None,
        size=_int(facts.get("size")),
        lines=_int(facts.get("lines")),
        matches=_int(facts["matches"]) if "matches" in facts else None,
        selected=_int(facts.get("selected")),
        data=_decode(encoding, "".join(body)),
    )


def _decode(encoding: str, text: str) -> bytes:
    try:
        if encoding == "b64":
            return base64.b64decode(text)
        if encoding == "hex":
            return bytes.fromhex(text)
    except (binascii.Error, ValueError):
        return b""
    return b""


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


_PUT_PY = """import sys, urllib.error, urllib.request
data = open(sys.argv[2], "rb").read()
req = urllib.request.Request(sys.argv[1], data=data, method="PUT", headers={"Content-Type": "application/octet-stream"})
try:
    r = urllib.request.urlopen(req, timeout=600); code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except OSError as e:
    code, body = 0, b""
open(sys.argv[3], "wb").write(body); print(code)
"""


def upload_script(root: str, run_id: str, url: str) -> str:
    """Snapshot the log (its size now: a live run keeps writing), gzip it when big, and PUT
    it to ``url`` (curl, else wget, else python3). Temporary files live beside the log."""
    s = SECTION
    return (
        header(root)
        + "LC_ALL=C\nexport LC_ALL\n"
        + f"LOG={log_path(run_id)}\n"
        + f"URL={q(url)}\n"
        + f'if [ ! -f "$LOG" ]; then echo "{s}nolog"; exit 0; fi\n'
        + "size=$(wc -c < \"$LOG\" | tr -d ' ')\n"
        + 'OUT="$LOG.upload.$$"\n'
        + 'trap \'rm -f "$OUT" "$OUT.answer"\' EXIT\n'
        + f'if [ "$size" -gt {GZIP_ABOVE} ]; then enc=gzip; head -c "$size" "$LOG" | gzip -c > "$OUT"\n'
        + 'else enc=plain; head -c "$size" "$LOG" > "$OUT"; fi\n'
        + "bytes=$(wc -c < \"$OUT\" | tr -d ' ')\n"
        + f'if [ "$bytes" -gt {MAX_UPLOAD} ]; then echo "{s}toolarge $size $bytes"; exit 0; fi\n'
        + "status=\n"
        + "if command -v curl >/dev/null 2>&1; then\n"
        + "  status=$(curl -sS -L --retry 3 -H 'Content-Type: application/octet-stream' -T \"$OUT\" "
        + '-o "$OUT.answer" -w \'%{http_code}\' "$URL" 2>/dev/null) || :\n'
        + "elif command -v wget >/dev/null 2>&1; then\n"
        + "  status=$(wget -S --tries=3 --timeout=60 --method=PUT --header='Content-Type: application/octet-stream' "
        + '--body-file="$OUT" --content-on-error -O "$OUT.answer" "$URL" 2>&1 '
        + "| sed -n 's/^ *HTTP\\/[0-9.]* \\([0-9][0-9][0-9]\\).*/\\1/p' | tail -n 1) || :\n"
        + "else\n"
        + f'  status=$(python3 -c {q(_PUT_PY)} "$URL" "$OUT" "$OUT.answer" 2>/dev/null) || :\n'
        + "fi\n"
        + "code=$(sed -n 's/.*<Code>\\([A-Za-z]*\\)<\\/Code>.*/\\1/p' \"$OUT.answer\" 2>/dev/null | head -n 1)\n"
        + f'echo "{s}put $enc $size $bytes ${{status:-0}} $code"\n'
    )


@dataclass(frozen=True)
class LogUpload:
    outcome: Literal["put", "nolog", "toolarge", "unreadable"]
    encoding: str = "plain"
    log_bytes: int = 0
    file_bytes: int = 0
    status: int = 0
    s3_code: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "put" and self.status == 200


def parse_upload(output: str) -> LogUpload:
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        parts = rest.split()
        if word == "nolog":
            return LogUpload("nolog")
        if word == "toolarge" and len(parts) == 2:
            return LogUpload("toolarge", "gzip", _int(parts[0]), _int(parts[1]))
        if word == "put" and len(parts) >= 4:
            code = parts[4] if len(parts) > 4 else ""
            return LogUpload("put", parts[0], _int(parts[1]), _int(parts[2]), _int(parts[3]), code)
    return LogUpload("unreadable")
