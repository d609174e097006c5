"""Checkpoint discovery scripts: list a run's checkpoint directory and verify
each manifest entry's sha256 and size on the instance; and the parser that
turns their output into listings (`discover`), shared by `/runctl checkpoints`,
the stop report and the terminate warning. Each call is one SSM command.

Output, one record a line; a name is the last field, encoded (workers/remote/frame.py), as is
everything else the instance wrote (the manifest's `created_at` is cut to ISO characters):

    ::runctl::newest <run-id>          newest run directory on the instance
    ::runctl::none                     no run directories at all
    ::runctl::norun <run-id>           the asked run has no directory (the id as asked, encoded)
    ::runctl::known <run-id>           (after norun) a run that has checkpoints, newest first
    ::runctl::run <run-id>             starts one listing
    ::runctl::manifest                 the listing's directory has a manifest.json
    ::runctl::entry <status> <epoch> <size> <want-size> <mtime> <created-at> <name>
    ::runctl::file <size> <mtime> <name>   checkpoint-looking file not in the manifest
    ::runctl::dir <size> <mtime> <name>    a sub-directory (e.g. save_pretrained output)
    ::runctl::more <count>             files left out to keep the output small
    ::runctl::hashed <count>           files whose sha256 was computed (not taken from the cache)

sha256s are cached per checkpoint directory in `.runctl-sha256` (one `<size:inode:mtime> <sha256>
<name>` line a file), so listing unchanged multi-GB checkpoints again reads none of them.

`status` is ok | sha | size | missing | unreadable | nosha | unverified; "-" marks
an unknown number. Rules as everywhere in this package: POSIX sh, `$RUNCTL_ROOT` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workers.aws.fleet import Fleet
from workers.errors import RemoteError
from workers.remote import bounds, frame
from workers.remote.shell import SECTION, header, q

# SSM returns at most 24000 chars of stdout; the listing stays well under it.
OUTPUT_LIMIT = 23_000
MAX_FILES_PER_RUN = 100
KNOWN_RUNS = 5
# A manifest bigger than this is not one we can use; read no more of it.
MANIFEST_LIMIT = 200_000

CHECKPOINT_PATTERNS = "*.pt|*.pth|*.ckpt|*.safetensors|*.bin|*.json|*.pkl|*.pickle|*.h5|*.keras|*.npz|*.npy|*.msgpack|*.onnx|*.tar|*.tar.gz|*.zip"

_FUNCTIONS = (
    "LC_ALL=C\nexport LC_ALL\n"
    'RUNS="$RUNCTL_ROOT/runs"\n'
    "nl='\n'\n"
    "hash_of() {\n"
    # From stdin: the output names no file, so a name cannot change its first field.
    '  if command -v sha256sum >/dev/null 2>&1; then sha256sum < "$1" 2>/dev/null | cut -d" " -f1\n'
    '  else shasum -a 256 < "$1" 2>/dev/null | cut -d" " -f1; fi\n'
    "}\n"
    "HASHED=0\n"
    "cached_hash() {  # cached_hash <dir> <name>: sets HASH\n"
    '  HASH=""; _key=$(stat -c "%s:%i:%y" "$1/$2" 2>/dev/null | tr " " "_")\n'
    '  _cache="$1/.runctl-sha256"\n'
    '  if [ -n "$_key" ] && [ -f "$_cache" ]; then\n'
    '    while IFS=" " read -r _k _h _n; do\n'
    '      if [ "$_k" = "$_key" ] && [ "$_n" = "$2" ]; then HASH=$_h; fi\n'
    "    done <<RUNCTL_CACHE\n"
    '$(grep -F -e "$_key " "$_cache" 2>/dev/null)\n'
    "RUNCTL_CACHE\n"
    "  fi\n"
    '  case "$HASH" in *[!0-9a-f]*) HASH="" ;; esac  # the cache file is the instance\'s to write\n'
    '  [ -n "$HASH" ] && return 0\n'
    '  HASH=$(hash_of "$1/$2"); HASHED=$((HASHED + 1))\n'
    '  if [ -n "$HASH" ] && [ -n "$_key" ]; then printf \'%s %s %s\\n\' "$_key" "$HASH" "$2" >> "$_cache" 2>/dev/null; fi\n'
    "  return 0\n"
    "}\n"
    "field() {  # field <json-object-text> <key> <value-pattern>\n"
    '  printf \'%s\\n\' "$1" | sed -n "s/.*\\"$2\\"[[:space:]]*:[[:space:]]*\\"\\{0,1\\}\\($3\\).*/\\1/p" | head -n 1\n'
    "}\n"
    "valid_id() {\n"
    '  case "$1" in ""|.|..|*[!A-Za-z0-9_.-]*) return 1 ;; esac\n'
    "}\n"
    "each_dir() {  # each_dir <callback> <rid>: `<callback> <dir> <name-prefix>` once for every place the run saves\n"
    '  _cb=$1; _base="$RUNS/$2"; _seen=$nl\n'
    '  visit "$_base/checkpoints" ""\n'
    '  visit "$_base/work/checkpoints" "./checkpoints/"\n'
    '  visit "$_base/work/outputs" "./outputs/"\n'
    '  if [ -f "$_base/checkpoint_dirs" ]; then\n'
    "    while IFS= read -r _d; do\n"
    '      case "$_d" in\n'
    '        "") continue ;;\n'
    '        /*) visit "$_d" "${_d%/}/" ;;\n'
    '        *) _r=${_d#./}; _r=${_r%/}; case "$_r" in ""|.) _p="./" ;; *) _p="./$_r/" ;; esac\n'
    '           visit "$_base/work/$_r" "$_p" ;;\n'
    "      esac\n"
    '    done < "$_base/checkpoint_dirs"\n'
    "  fi\n"
    "}\n"
    "visit() {  # the same directory named twice (a symlink, ./x and x) is visited once\n"
    '  [ -d "$1" ] || return 0\n'
    '  _real=$(cd "$1" 2>/dev/null && pwd -P) || return 0\n'
    '  case "$_seen" in *"$nl$_real$nl"*) return 0 ;; esac\n'
    '  _seen="$_seen$_real$nl"\n'
    '  "$_cb" "$1" "$2"\n'
    "}\n"
    "FOUND=0\n"
    "find_any() {  # sets FOUND=1 when the directory holds something besides manifest/marker\n"
    '  for p in "$1"/*; do\n'
    '    [ -e "$p" ] || continue\n'
    '    case "${p##*/}" in manifest.json|completed.json) continue ;; esac\n'
    "    FOUND=1; return 0\n"
    "  done\n"
    "}\n"
    "has_ckpt() {  # has_ckpt <rid>\n"
    '  FOUND=0; each_dir find_any "$1"; [ "$FOUND" = 1 ]\n'
    "}\n"
    "list_run() {  # newest first in each place, at most MAX rows for the run\n"
    "  N=0; MORE=0\n"
    '  echo "' + SECTION + 'run $1"\n'
    '  each_dir list_dir "$1"\n'
    '  if [ "$MORE" -gt 0 ]; then echo "' + SECTION + 'more $MORE"; fi\n'
    "}\n"
    "room() {  # counts a row; false once the run has MAX rows\n"
    f'  N=$((N + 1)); [ "$N" -le {MAX_FILES_PER_RUN} ] && return 0\n'
    "  MORE=$((MORE + 1)); return 1\n"
    "}\n"
    "list_dir() {  # list_dir <dir> <name-prefix>\n"
    "  ck=$1; pre=$2; listed=/\n"
    '  if [ -f "$ck/manifest.json" ]; then\n'
    '    echo "' + SECTION + 'manifest"\n'
    # One entry object a line, whatever the manifest's layout (entries are flat objects),
    # newest (last) first.
    f"    entries=$(head -c {MANIFEST_LIMIT} \"$ck/manifest.json\" | tr -d '\\r\\n' | tr '}}' '\\n' "
    "| awk '{ l[NR] = $0 } END { for (i = NR; i > 0; i--) print l[i] }')\n"
    "    while IFS= read -r obj; do\n"
    '      name=$(printf \'%s\\n\' "$obj" | sed -n \'s/.*"file"[[:space:]]*:[[:space:]]*"\\([^"/]*\\)".*/\\1/p\')\n'
    '      case "$name" in ""|.|..) continue ;; esac\n'
    '      case "$listed" in *"/$name/"*) continue ;; esac\n'
    '      listed="$listed$name/"\n'
    "      room || continue\n"
    "      want_sha=$(field \"$obj\" sha256 '[0-9a-fA-F]*' | tr 'A-F' 'a-f')\n"
    "      want_size=$(field \"$obj\" size '[0-9][0-9]*')\n"
    "      epoch=$(field \"$obj\" epoch '[0-9][0-9]*')\n"
    "      created=$(field \"$obj\" created_at '[^\" ]*' | tr -cd '0-9A-Za-z:.+_-')\n"
    '      f="$ck/$name"\n'
    '      if [ ! -f "$f" ]; then\n'
    "        printf '%s\\n' \""
    + SECTION
    + 'entry missing ${epoch:--} - ${want_size:--} - ${created:--} $(enc_word "$pre$name")"; continue\n'
    "      fi\n"
    '      size=$(wc -c < "$f" | tr -d " ")\n'
    '      mtime=$(date -r "$f" +%s 2>/dev/null || echo -)\n'
    '      if [ -n "$want_size" ] && [ "$size" != "$want_size" ]; then st=size\n'
    '      elif [ "$VERIFY" != 1 ]; then st=unverified\n'
    '      elif [ -z "$want_sha" ]; then st=nosha\n'
    "      else\n"
    '        cached_hash "$ck" "$name"; got=$HASH\n'
    '        if [ -z "$got" ]; then st=unreadable\n'
    '        elif [ "$got" = "$want_sha" ]; then st=ok\n'
    "        else st=sha; fi\n"
    "      fi\n"
    "      printf '%s\\n' \""
    + SECTION
    + 'entry $st ${epoch:--} $size ${want_size:--} $mtime ${created:--} $(enc_word "$pre$name")"\n'
    "    done <<RUNCTL_MANIFEST\n"
    "$entries\n"
    "RUNCTL_MANIFEST\n"
    "  fi\n"
    "  while IFS= read -r name; do\n"  # newest first
    '    [ -n "$name" ] || continue\n'
    '    f="$ck/$name"\n'
    '    case "$name" in manifest.json|completed.json) continue ;; esac\n'
    '    case "$listed" in *"/$name/"*) continue ;; esac\n'
    '    if [ -d "$f" ]; then\n'
    "      kind=dir\n"
    '    elif [ -f "$f" ]; then\n'
    f'      case "$name" in {CHECKPOINT_PATTERNS}) kind=file ;; *) continue ;; esac\n'
    "    else\n"
    "      continue\n"
    "    fi\n"
    "    room || continue\n"
    '    if [ "$kind" = dir ]; then\n'
    '      kb=$(du -sk "$f" 2>/dev/null | cut -f1); size=$(( ${kb:-0} * 1024 ))\n'
    "    else\n"
    '      size=$(wc -c < "$f" | tr -d " ")\n'
    "    fi\n"
    "    printf '%s\\n' \""
    + SECTION
    + '$kind $size $(date -r "$f" +%s 2>/dev/null || echo -) $(enc_word "$pre$name")"\n'
    "  done <<RUNCTL_FILES\n"
    '$(ls -t "$ck" 2>/dev/null)\n'
    "RUNCTL_FILES\n"
    "}\n"
    "runs_with_checkpoints() {  # newest first\n"
    '  ids=""\n'
    '  for d in "$RUNS"/*/; do\n'
    '    [ -d "$d" ] || continue\n'
    '    rid=$(basename "$d"); valid_id "$rid" || continue\n'
    '    if has_ckpt "$rid"; then ids="$rid $ids"; fi\n'
    "  done\n"
    '  echo "$ids"\n'
    "}\n"
)


_HASHED = 'echo "' + SECTION + 'hashed $HASHED"\n'


def prelude(root: str, verify: bool) -> str:
    """The header and the discovery's shell functions, for scripts that build on them."""
    return header(root) + f"VERIFY={1 if verify else 0}\n" + frame.ENC + _FUNCTIONS


_prelude = prelude


def list_checkpoints(root: str, run_id: str | None, verify: bool = True) -> str:
    """One run's checkpoints; without run_id, the newest run that has any
    (else the newest run). A resumed run writes into the run it resumed."""
    s = SECTION
    if run_id is not None:
        body = (
            f"RUN={q(run_id)}\n"
            'if valid_id "$RUN" && [ -d "$RUNS/$RUN" ]; then\n'
            '  list_run "$RUN"\n'
            "else\n"
            '  echo "' + s + 'norun $(enc_word "$RUN")"\n'
            "  n=0\n"
            "  for rid in $(runs_with_checkpoints); do\n"
            f'    n=$((n + 1)); [ "$n" -le {KNOWN_RUNS} ] || break\n'
            '    echo "' + s + 'known $rid"\n'
            "  done\n"
            "fi\n"
        )
    else:
        body = (
            'newest=""\n'
            'for d in "$RUNS"/*/; do\n'
            '  [ -d "$d" ] || continue\n'
            '  rid=$(basename "$d"); valid_id "$rid" && newest=$rid\n'
            "done\n"
            'if [ -z "$newest" ]; then echo "' + s + 'none"; exit 0; fi\n'
            'echo "' + s + 'newest $newest"\n'
            "set -- $(runs_with_checkpoints)\n"
            'list_run "${1:-$newest}"\n'
        )
    return _prelude(root, verify) + f"{{\n{body}{_HASHED}}} | head -c {OUTPUT_LIMIT}\nexit 0\n"


def list_all_checkpoints(root: str, verify: bool = True) -> str:
    """Every run directory that holds checkpoints, newest first."""
    body = 'for rid in $(runs_with_checkpoints); do list_run "$rid"; done\n'
    return _prelude(root, verify) + f"{{\n{body}{_HASHED}}} | head -c {OUTPUT_LIMIT}\nexit 0\n"


# Hashing multi-GB checkpoints takes a while; the listing waits for it.
DISCOVERY_TIMEOUT = 600

_EPOCH_IN_NAME = re.compile(r"epoch[-_]?0*(\d+)", re.IGNORECASE)

_PROBLEMS = {
    "sha": "sha256 does not match the manifest",
    "missing": "file is missing",
    "unreadable": "file cannot be read",
}
_UNKNOWN = {"nosha", "unverified"}  # manifest entry without a sha256, or verify=False


@dataclass(frozen=True)
class FoundCheckpoint:
    name: str
    size: int
    modified_at: datetime
    epoch: int | None
    sha256_ok: bool | None  # None: no manifest entry (or no sha256 in it), integrity unknown
    problem: str = ""  # why sha256_ok is False, in words
    is_dir: bool = False


@dataclass(frozen=True)
class CheckpointListing:
    run_id: str | None  # None: the instance has no run directories
    checkpoints: list[FoundCheckpoint]  # newest first: by epoch where known, then by mtime
    has_manifest: bool
    newest_run_id: str | None = None  # the newest run on the instance (with run_id=None asked)
    missing: bool = False  # the asked run has no directory on the instance
    known_runs: tuple[str, ...] = ()  # with `missing`: runs that do have checkpoints, newest first
    omitted: int = 0  # files left out of the listing to keep it small

    @property
    def newest(self) -> FoundCheckpoint | None:
        return self.checkpoints[0] if self.checkpoints else None

    @property
    def newest_valid(self) -> FoundCheckpoint | None:
        """The newest checkpoint whose sha256 and size were verified."""
        return next((c for c in self.checkpoints if c.sha256_ok is True), None)

    @property
    def corrupt(self) -> list[FoundCheckpoint]:
        return [c for c in self.checkpoints if c.sha256_ok is False]

    @property
    def unverified(self) -> list[FoundCheckpoint]:
        return [c for c in self.checkpoints if c.sha256_ok is None]

    @property
    def total_size(self) -> int:
        return sum(c.size for c in self.checkpoints)


def discover(fleet: Fleet, root: str, instance_id: str, run_id: str | None, verify: bool = True) -> CheckpointListing:
    """The checkpoints of `run_id`, or of the newest run that has any (else the newest run)."""
    listings = parse(_run(fleet, instance_id, list_checkpoints(root, run_id, verify)))
    if listings:
        return listings[0]
    return CheckpointListing(run_id=run_id, checkpoints=[], has_manifest=False)


def discover_all(fleet: Fleet, root: str, instance_id: str, verify: bool = True) -> list[CheckpointListing]:
    """Every run directory on the instance that holds checkpoints, newest run first."""
    return [
        listing
        for listing in parse(_run(fleet, instance_id, list_all_checkpoints(root, verify)))
        if listing.run_id is not None
    ]


def _run(fleet: Fleet, instance_id: str, script: str) -> str:
    result = fleet.run(instance_id, script, timeout=DISCOVERY_TIMEOUT)
    if not result.ok:
        raise RemoteError(
            f"Listing the checkpoints on {instance_id} failed ({result.status}, exit {result.exit_code}).",
            why="The discovery script could not read the run directories.",
            fix=f"/runctl status {instance_id}",
            detail=(result.stderr or result.stdout).strip()[-1500:],
        )
    return result.stdout


@dataclass
class _Draft:
    run_id: str | None
    checkpoints: list[FoundCheckpoint] = field(default_factory=list)
    has_manifest: bool = False
    omitted: int = 0


def parse(output: str) -> list[CheckpointListing]:
    """Listings from the discovery script's output; malformed lines are skipped."""
    lines = output.splitlines()
    if output and not output.endswith("\n"):
        lines = lines[:-1]  # cut by the output limit mid-line
    newest_run: str | None = None
    missing: str | None = None
    known: list[str] = []
    drafts: list[_Draft] = []
    for line in lines:
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        if word == "newest":
            newest_run = rest.strip() or None
        elif word == "norun":
            missing = frame.text(rest.strip()) or ""
        elif word == "known":
            known.append(rest.strip())
        elif word == "run":
            drafts.append(_Draft(run_id=rest.strip()))
        elif drafts and word == "manifest":
            drafts[-1].has_manifest = True
        elif drafts and word == "more" and rest.strip().isdigit():
            drafts[-1].omitted += int(rest)
        elif drafts and word in ("entry", "file", "dir"):
            found = _entry(rest) if word == "entry" else _file(rest, is_dir=word == "dir")
            if found is not None:
                drafts[-1].checkpoints.append(found)
    if missing is not None:
        return [
            CheckpointListing(run_id=missing, checkpoints=[], has_manifest=False, missing=True, known_runs=tuple(known))
        ]
    if not drafts:
        return []
    return [
        CheckpointListing(
            run_id=d.run_id,
            checkpoints=sorted(d.checkpoints, key=_newest_first),
            has_manifest=d.has_manifest,
            newest_run_id=newest_run,
            omitted=d.omitted,
        )
        for d in drafts
    ]


def _newest_first(c: FoundCheckpoint) -> tuple[int, int, float]:
    """Ties keep the script's order, which is newest first (`ls -t` is finer than seconds)."""
    known = 0 if c.epoch is not None else 1
    return (known, -(c.epoch or 0), -c.modified_at.timestamp())


def _int(text: str) -> int | None:
    return bounds.count(text)


def _time(epoch_seconds: str, iso: str = "-") -> datetime:
    if (moment := bounds.instant(epoch_seconds)) is not None:
        return moment
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _entry(rest: str) -> FoundCheckpoint | None:
    parts = rest.split(" ", 6)
    if len(parts) != 7 or not parts[6]:
        return None
    status, epoch, size, want_size, mtime, created, token = parts
    name = frame.name(token)
    if not name:
        return None
    if status == "ok":
        ok: bool | None = True
    elif status in _UNKNOWN:
        ok = None
    else:
        ok = False
    problem = _PROBLEMS.get(status, "")
    if status == "size":
        problem = f"size is {size} bytes, the manifest says {want_size}"
    elif ok is False and not problem:
        problem = f"integrity check failed ({status})"
    return FoundCheckpoint(
        name=name,
        size=_int(size) or 0,
        modified_at=_time(mtime, created),
        epoch=_int(epoch),
        sha256_ok=ok,
        problem=problem,
    )


def _file(rest: str, is_dir: bool) -> FoundCheckpoint | None:
    parts = rest.split(" ", 2)
    name = frame.name(parts[2]) if len(parts) == 3 else None
    size = _int(parts[0])
    if size is None or not name:
        return None
    match = _EPOCH_IN_NAME.search(name)
    return FoundCheckpoint(
        name=name,
        size=size,
        modified_at=_time(parts[1]),
        epoch=_int(match.group(1)) if match else None,
        sha256_ok=None,
        is_dir=is_dir,
    )
