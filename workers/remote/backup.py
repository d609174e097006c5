"""Backup and restore scripts: instances have no AWS credentials, so the worker presigns
one URL per file and the instance moves the bytes with curl.

Names are the discovery's (``workers.remote.checkpoints``): a bare name lives in the run's
``$RUNCTL_CHECKPOINT_DIR`` (``runs/<run-id>/checkpoints``), ``./dir/name`` in the run's
working directory (``runs/<run-id>/work``), ``/dir/name`` is absolute. ``instance_path``
turns one into shell text; ``s3_suffix`` into the object key under the run's prefix.

Output, one record a line (names last and encoded: workers/remote/frame.py):

    ::runctl::more <count> / ::runctl::known <count>  first: files left for the next pass, files in S3
    ::runctl::sum <size> <mtime> <sha256|-> <name>     a file the run saved (sha "-": too big to hash)
    ::runctl::end                                      last: without it the listing was cut
    ::runctl::subdir <name>                            a directory (not backed up)
    ::runctl::put <index> <http-status|gone|changed> <S3 error code>
    ::runctl::got <index> <have|ok|sha|http-status>
    ::runctl::nocurl
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from workers.remote import frame
from workers.remote.checkpoints import OUTPUT_LIMIT, prelude
from workers.remote.shell import SECTION, heredoc_end, q, run_dir

# S3 takes at most 5 GB in one PUT; bigger files would need a multipart upload.
SINGLE_PUT_LIMIT = 5 * 1024**3
MAX_FILES = 120  # sum lines per pass
LIST_BUDGET = OUTPUT_LIMIT - 200  # the listing's bytes: it and its counters stay under SSM's 24,000
# SSM refuses a command whose document and parameters pass 64 KB (MaxDocumentSizeExceeded);
# a script, as the JSON SendCommand carries it, stays well under that.
COMMAND_LIMIT = 48_000
KNOWN_BUDGET = 24_000  # of a sums command: the keys of the known files (17 bytes each)
# Of a restore: the part of the launch command it shares with the wrapper and the code's URL
# (or, for the batches before it, a command of its own).
RESTORE_BUDGET = 24_000
RESTORE_FAILED = 22

_SUMS = (
    "key_of() {  # a known file's key: the first 16 hex digits of the sha256 of its `size mtime name`\n"
    "  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -c1-16; else shasum -a 256 | cut -c1-16; fi\n"
    "}\n"
    "fits() {  # fits <bytes>: counts a record's bytes; false once the listing would pass its budget\n"
    f"  [ $((BYTES + $1)) -le {LIST_BUDGET} ] && BYTES=$((BYTES + $1))\n"
    "}\n"
    "sum_dir() {  # sum_dir <dir> <name-prefix>: every regular file, newest first\n"
    "  while IFS= read -r name; do\n"
    '    [ -n "$name" ] || continue\n'
    '    f="$1/$name"\n'
    '    case "$name" in *.tmp|*.part) continue ;; esac\n'
    '    if [ -d "$f" ]; then tok=$(enc_word "$2$name"); fits $((20 + ${#tok})) && printf \'%s\\n\' "'
    + SECTION
    + 'subdir $tok"; continue; fi\n'
    '    [ -f "$f" ] || continue\n'
    '    size=$(wc -c < "$f" | tr -d " ")\n'
    '    mtime=$(date -r "$f" +%s 2>/dev/null || echo -)\n'
    # In S3 as it is here (same size, mtime and name): the worker knows it, skip it unhashed.
    "    k=$(printf '%s' \"$size $mtime $2$name\" | key_of)\n"
    '    if grep -Fqx -e "$k" "$KNOWN" 2>/dev/null; then KNOWN_HITS=$((KNOWN_HITS + 1)); continue; fi\n'
    '    tok=$(enc_word "$2$name")\n'
    # A sum record is at most 110 bytes besides its name: what does not fit waits for the next pass.
    f'    if [ "$LISTED" -ge {MAX_FILES} ] || ! fits $((110 + ${{#tok}})); then MORE=$((MORE + 1)); continue; fi\n'
    "    LISTED=$((LISTED + 1))\n"
    f'    if [ "$size" -gt {SINGLE_PUT_LIMIT} ]; then HASH=-; else cached_hash "$1" "$name"; fi\n'
    "    printf '%s\\n' \"" + SECTION + 'sum $size $mtime ${HASH:--} $tok"\n'
    "  done <<RUNCTL_FILES\n"
    '$(ls -t "$1" 2>/dev/null)\n'
    "RUNCTL_FILES\n"
    "}\n"
)


def places(run_id: str, dirs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Where the run saves, as (shell path, name prefix): its checkpoint directory, its work
    directory's `checkpoints/`, and `dirs` (the `--checkpoint-dir`/`--output-dir` values of the
    bot's run record; relative ones in the work directory). Never the instance's own list."""
    found = [(f"{run_dir(run_id)}/checkpoints", ""), (f"{run_dir(run_id)}/work/checkpoints", "./checkpoints/")]
    for d in dirs:
        rel = d.removeprefix("./").rstrip("/")
        if not d or "\n" in d or "\0" in d or "//" in d or (rel not in ("", ".") and _BAD_PART.search(rel)):
            continue
        if d.startswith("/"):
            found.append((q(d), d.rstrip("/") + "/"))
        elif rel in ("", "."):
            found.append((f"{run_dir(run_id)}/work", "./"))
        else:
            found.append((f"{run_dir(run_id)}/work/{q(rel)}", f"./{rel}/"))
    return found


def listed_under(name: str, prefixes: Sequence[str]) -> bool:
    """`name` is a file directly in one of the places asked for (by their name prefixes)."""
    return any(name.startswith(p) and name[len(p) :] and "/" not in name[len(p) :] for p in prefixes)


def known_key(size: int, mtime: int, name: str) -> str:
    """What the instance matches a known file by (its `key_of`): short, whatever the name's length."""
    return hashlib.sha256(f"{size} {mtime} {name}".encode()).hexdigest()[:16]


def sums(root: str, run_id: str, known: Sequence[tuple[int, int, str]] = (), dirs: Sequence[str] = ()) -> str:
    """Size, mtime and sha256 of the files in every place the run saves (`places`), newest
    first, as many as MAX_FILES and LIST_BUDGET allow, leaving out the `known` ones (size,
    mtime, name: what S3 already holds as it is here; sent as `known_key`s, as many as
    KNOWN_BUDGET holds, first ones first). The counters come first and `::end` last, so a cut listing shows."""
    visits = "".join(f"visit {path} {q(prefix)}\n" for path, prefix in places(run_id, dirs))
    lines = [known_key(size, mtime, name) + "\n" for size, mtime, name in known if "\n" not in name]
    lines = lines[: KNOWN_BUDGET // 17]
    eof = heredoc_end("".join(lines))
    return (
        prelude(root, verify=True)
        + "KNOWN=$(mktemp) || exit 1\nLIST=$(mktemp) || exit 1\nLISTED=0 MORE=0 KNOWN_HITS=0 BYTES=0\n"
        + f"cat > \"$KNOWN\" <<'{eof}'\n{''.join(lines)}{eof}\n"
        + _SUMS
        + f'{{\nif valid_id {q(run_id)}; then\n_cb=sum_dir; _seen=$nl\n{visits}fi\n}} > "$LIST"\n'
        + f'{{\necho "{SECTION}more $MORE"\necho "{SECTION}known $KNOWN_HITS"\ncat "$LIST"\necho "{SECTION}end"\n'
        + f'}} | head -c {OUTPUT_LIMIT}\nrm -f "$KNOWN" "$LIST"\nexit 0\n'
    )


_BAD_PART = re.compile(r"(^|/)\.\.?(/|$)")


def restorable_name(name: str) -> bool:
    """A name a restore may write: a plain, visible file name in the run's checkpoint
    directory. Never `./…` (the work directory, whose code runs) nor `/…` (anywhere)."""
    return bool(name) and len(name) <= 255 and not name.startswith(".") and not any(c in name for c in "/\n\r\0")


def safe_name(name: str) -> bool:
    """A name the discovery could have printed, naming no place outside its own: no `..`,
    no newline, no NUL."""
    if not name or "\n" in name or "\0" in name or name.endswith("/"):
        return False
    rest = name[2:] if name.startswith("./") else name.lstrip("/") if name.startswith("/") else name
    if not name.startswith(("./", "/")) and "/" in name:
        return False
    return bool(rest) and not _BAD_PART.search(rest) and "//" not in rest


def instance_path(run_id: str, name: str) -> str:
    """Shell text for the file `name` of the run that owns the checkpoints."""
    if name.startswith("/"):
        return q(name)
    if name.startswith("./"):
        return f"{run_dir(run_id)}/work/{q(name[2:])}"
    return f"{run_dir(run_id)}/checkpoints/{q(name)}"


def s3_suffix(name: str) -> str:
    """The object key under `runctl/checkpoints/<run-id>/` for a name."""
    if name.startswith("/"):
        return "abs" + name
    if name.startswith("./"):
        return "work/" + name[2:]
    return "ckpt/" + name


@dataclass(frozen=True)
class Upload:
    index: int
    name: str
    sha256: str
    url: str


@dataclass(frozen=True)
class Download:
    index: int
    name: str
    sha256: str
    url: str
    mtime: int | None = None  # the file's mtime when it was backed up: restored with it, S3 still holds it as it is

    @property
    def stamp(self) -> str:
        """`touch -t` of the mtime (POSIX; read as UTC under TZ=UTC0), "" without one."""
        return time.strftime("%Y%m%d%H%M.%S", time.gmtime(self.mtime)) if self.mtime is not None else ""


_PUT = (
    'command -v curl >/dev/null 2>&1 || { echo "' + SECTION + 'nocurl"; exit 0; }\n'
    "OUT=$(mktemp) ERR=$(mktemp)\n"
    "put() {  # put <index> <file> <sha256> <url>\n"
    '  if [ ! -f "$2" ]; then echo "' + SECTION + 'put $1 gone -"; return 0; fi\n'
    '  cached_hash "${2%/*}" "${2##*/}"\n'
    '  if [ "$HASH" != "$3" ]; then echo "' + SECTION + 'put $1 changed -"; return 0; fi\n'
    '  code=$(curl -sS --retry 3 -X PUT -T "$2" -o "$OUT" -w \'%{http_code}\' "$4" 2>"$ERR") || :\n'
    # Only S3's error code: its message may echo the request, and the URL never leaves the instance.
    "  why=$(sed -n 's/.*<Code>\\([A-Za-z]*\\)<\\/Code>.*/\\1/p' \"$OUT\" | head -n 1)\n"
    '  echo "' + SECTION + 'put $1 ${code:-000} ${why:--}"\n'
    "}\n"
)


def command_size(text: str) -> int:
    """A script's bytes as SendCommand's JSON parameters carry it."""
    return len(json.dumps([text]).encode())


def upload(root: str, run_id: str, uploads: Sequence[Upload]) -> str:
    """PUT each file to its presigned URL, unless it changed since it was hashed."""
    calls = "".join(
        f'F={instance_path(run_id, u.name)}\nU={q(u.url)}\nput {u.index} "$F" {q(u.sha256)} "$U"\n' for u in uploads
    )
    return prelude(root, verify=True) + _PUT + calls + 'rm -f "$OUT" "$ERR"\nexit 0\n'


_GET = (
    'command -v curl >/dev/null 2>&1 || { echo "' + SECTION + 'nocurl"; exit ' + str(RESTORE_FAILED) + "; }\n"
    "FAILED=0\n"
    "get() {  # get <index> <name> <sha256> <url>: into $CK, in place only once its sha256 matches\n"
    '  f="$CK/$2"\n'
    # A link in the file's place is replaced, never followed; a directory there is refused.
    '  if [ ! -L "$f" ] && [ -f "$f" ] && [ "$(hash_of "$f")" = "$3" ]; then stamp "$f" "$5"; echo "'
    + SECTION
    + 'got $1 have"; return 0; fi\n'
    '  if [ -L "$f" ]; then rm -f "$f"; fi\n'
    '  if [ -e "$f" ] && [ ! -f "$f" ]; then echo "' + SECTION + 'got $1 dir"; FAILED=1; return 0; fi\n'
    '  tmp=$(mktemp "$CK/.runctl-restore.XXXXXX") || { echo "' + SECTION + 'got $1 mkdir"; FAILED=1; return 0; }\n'
    '  code=$(curl -sSL --retry 3 -o "$tmp" -w \'%{http_code}\' "$4" 2>/dev/null) || :\n'
    '  if [ "$code" != 200 ]; then rm -f "$tmp"; echo "' + SECTION + 'got $1 ${code:-000}"; FAILED=1; return 0; fi\n'
    '  if [ "$(hash_of "$tmp")" != "$3" ]; then rm -f "$tmp"; echo "'
    + SECTION
    + 'got $1 sha"; FAILED=1; return 0; fi\n'
    '  chmod 644 "$tmp"; mv -f "$tmp" "$f" && stamp "$f" "$5" && echo "' + SECTION + 'got $1 ok"\n'
    "}\n"
    # The backed-up mtime again: S3 holds the file as it is here (name, size, mtime), so a listing,
    # a terminate and the next backup count it as backed up (issue 31).
    'stamp() { if [ -n "$2" ]; then TZ=UTC0 touch -t "$2" "$1" 2>/dev/null || :; fi; return 0; }\n'
)
# The run's checkpoint directory, physically under the run directory: no link leads a
# restore out of it (into the work directory, or anywhere else on the instance).
_CHECKPOINT_DIR = (
    'mkdir -p "$CK" 2>/dev/null\n'
    'ck_real=$(cd "$CK" 2>/dev/null && pwd -P) || ck_real=""\n'
    'runs_real=$(cd "$RUNCTL_ROOT/runs" 2>/dev/null && pwd -P) || runs_real=""\n'
    'if [ -z "$ck_real" ] || [ "$ck_real" != "$runs_real/$RUN/checkpoints" ]; then\n'
    "  echo 'runctl: could not restore the checkpoints from S3: the run'\\''s checkpoint directory "
    "is not a directory of its own under the run directory' >&2\n"
    f"  exit {RESTORE_FAILED}\n"
    "fi\n"
)


def restore(root: str, run_id: str, downloads: Sequence[Download]) -> str:
    """Fetch each missing file from S3 into the run's checkpoint directory and verify its
    sha256 before it takes its place; exits RESTORE_FAILED if any could not be restored.
    Only `restorable_name`s: a restore writes nowhere else. Ends without `exit` on success,
    so a launch can follow it in the same command."""
    bad = [d.name for d in downloads if not restorable_name(d.name)]
    if bad:
        raise ValueError(f"not names in the checkpoint directory: {bad!r}")
    calls = "".join(f"get {d.index} {q(d.name)} {q(d.sha256)} {q(d.url)} {q(d.stamp)}\n" for d in downloads)
    return (
        "LC_ALL=C\nexport LC_ALL\n"
        f"RUN={q(run_id)}\n"
        f"CK={run_dir(run_id)}/checkpoints\n"
        "hash_of() {\n"
        '  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" 2>/dev/null | cut -d" " -f1\n'
        '  else shasum -a 256 "$1" 2>/dev/null | cut -d" " -f1; fi\n'
        "}\n"
        + _GET
        + _CHECKPOINT_DIR
        + calls
        + 'if [ "$FAILED" != 0 ]; then echo "runctl: could not restore the checkpoints from S3" >&2; '
        + f"exit {RESTORE_FAILED}; fi\n"
    )


def restore_batches(run_id: str, downloads: Sequence[Download], budget: int = RESTORE_BUDGET) -> list[list[Download]]:
    """The downloads in restores that each stay under `budget` bytes as SendCommand carries
    them (a single file's restore is its own batch, whatever its size). The last batch goes in
    the launch command; the others run first, each in a command of its own (`restore_only`)."""
    batches: list[list[Download]] = []
    batch: list[Download] = []
    for d in downloads:
        batch.append(d)
        if len(batch) > 1 and command_size(restore("", run_id, batch)) > budget:
            batches.append(batch[:-1])
            batch = batch[-1:]
    if batch:
        batches.append(batch)
    return batches


def restore_only(root: str, run_id: str, downloads: Sequence[Download]) -> str:
    """A restore as a command of its own (a batch before the launch's)."""
    return restore(root, run_id, downloads) + "exit 0\n"


@dataclass(frozen=True)
class Sum:
    name: str
    size: int
    mtime: int
    sha256: str  # "" when too big to hash


@dataclass
class Sums:
    files: list[Sum]
    subdirs: list[str]  # not backed up
    more: int = 0  # files left for another pass
    known: int = 0  # files S3 holds as they are here
    complete: bool = True  # False: the listing was cut (no `::end`)


def parse_sums(output: str) -> Sums:
    found: list[Sum] = []
    subdirs: list[str] = []
    counts = {"more": 0, "known": 0}
    complete = False
    lines = output.splitlines()
    if output and not output.endswith("\n"):
        lines = lines[:-1]  # cut by the output limit mid-line
    for line in lines:
        word, _, rest = line[len(SECTION) :].partition(" ") if line.startswith(SECTION) else ("", "", "")
        if word in counts and rest.strip().isdigit():
            counts[word] = int(rest)
            continue
        if line == SECTION + "end":
            complete = True
            continue
        if line.startswith(SECTION + "subdir "):
            if (subdir := frame.name(line[len(SECTION) + 7 :])) is not None:
                subdirs.append(subdir)
            continue
        if not line.startswith(SECTION + "sum "):
            continue
        parts = line[len(SECTION) + 4 :].split(" ", 3)
        name = frame.name(parts[3]) if len(parts) == 4 else None
        if name is None or not parts[0].isdigit() or not safe_name(name):
            continue
        sha = parts[2] if re.fullmatch(r"[0-9a-f]{64}", parts[2]) else ""
        found.append(Sum(name, int(parts[0]), int(parts[1]) if parts[1].isdigit() else 0, sha))
    return Sums(found, subdirs, counts["more"], counts["known"], complete)


def parse_records(output: str, word: str) -> dict[int, tuple[str, str]]:
    """`put`/`got` records by index: (outcome, S3 error code or "")."""
    out: dict[int, tuple[str, str]] = {}
    for line in output.splitlines():
        if line.startswith(f"{SECTION}{word} "):
            parts = line[len(SECTION) + len(word) + 1 :].split()
            if parts and parts[0].isdigit():
                why = parts[2] if len(parts) > 2 and parts[2] != "-" else ""
                out[int(parts[0])] = (parts[1] if len(parts) > 1 else "", why)
    return out
