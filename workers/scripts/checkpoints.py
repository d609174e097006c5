"""Checkpoint discovery scripts: list a run's checkpoint directory and verify
each manifest entry's sha256 and size on the instance.

Output, one record a line (names are always the last field, so they may hold spaces):

    ::runctl::newest <run-id>          newest run directory on the instance
    ::runctl::none                     no run directories at all
    ::runctl::norun <run-id>           the asked run has no directory
    ::runctl::known <run-id>           (after norun) a run that has checkpoints, newest first
    ::runctl::run <run-id>             starts one listing
    ::runctl::manifest                 the listing's directory has a manifest.json
    ::runctl::entry <status> <epoch> <size> <want-size> <mtime> <created-at> <name>
    ::runctl::file <size> <mtime> <name>   checkpoint-looking file not in the manifest
    ::runctl::dir <size> <mtime> <name>    a sub-directory (e.g. save_pretrained output)
    ::runctl::more <count>             files left out to keep the output small

`status` is ok | sha | size | missing | unreadable | nosha | unverified; "-" marks
an unknown number. Rules as everywhere in this package: POSIX sh, `$RUNCTL_ROOT` only.
"""

from __future__ import annotations

from workers.scripts.core import SECTION, header, q

# SSM returns at most 24000 chars of stdout; the listing stays well under it.
OUTPUT_LIMIT = 23_000
MAX_FILES_PER_RUN = 100
KNOWN_RUNS = 5
# A manifest bigger than this is not one we can use; read no more of it.
MANIFEST_LIMIT = 200_000

CHECKPOINT_PATTERNS = (
    "*.pt|*.pth|*.ckpt|*.safetensors|*.bin|*.json|*.pkl|*.pickle|*.h5|*.keras|*.npz|*.npy|*.msgpack|*.onnx|*.tar|*.tar.gz|*.zip"
)

_FUNCTIONS = (
    "LC_ALL=C\nexport LC_ALL\n"
    'RUNS="$RUNCTL_ROOT/runs"\n'
    "nl='\n'\n"
    "hash_of() {\n"
    '  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" 2>/dev/null | cut -d" " -f1\n'
    '  else shasum -a 256 "$1" 2>/dev/null | cut -d" " -f1; fi\n'
    "}\n"
    "field() {  # field <json-object-text> <key> <value-pattern>\n"
    '  printf \'%s\\n\' "$1" | sed -n "s/.*\\"$2\\"[[:space:]]*:[[:space:]]*\\"\\{0,1\\}\\($3\\).*/\\1/p" | head -n 1\n'
    "}\n"
    "valid_id() {\n"
    '  case "$1" in ""|*[!A-Za-z0-9_.-]*) return 1 ;; esac\n'
    "}\n"
    "has_ckpt() {  # the run directory's checkpoints/ holds something besides manifest/marker\n"
    '  [ -d "$1/checkpoints" ] || return 1\n'
    '  for p in "$1/checkpoints"/*; do\n'
    '    [ -e "$p" ] || continue\n'
    '    case "${p##*/}" in manifest.json|completed.json) continue ;; esac\n'
    "    return 0\n"
    "  done\n"
    "  return 1\n"
    "}\n"
    "list_run() {\n"
    '  rid=$1; ck="$RUNS/$rid/checkpoints"; listed=/\n'
    '  echo "' + SECTION + 'run $rid"\n'
    '  if [ -f "$ck/manifest.json" ]; then\n'
    '    echo "' + SECTION + 'manifest"\n'
    # One entry object a line, whatever the manifest's layout; entries are flat objects.
    f'    entries=$(head -c {MANIFEST_LIMIT} "$ck/manifest.json" | tr -d \'\\r\\n\' | tr \'}}\' \'\\n\')\n'
    "    while IFS= read -r obj; do\n"
    '      name=$(printf \'%s\\n\' "$obj" | sed -n \'s/.*"file"[[:space:]]*:[[:space:]]*"\\([^"/]*\\)".*/\\1/p\')\n'
    '      case "$name" in ""|.|..) continue ;; esac\n'
    '      case "$listed" in *"/$name/"*) continue ;; esac\n'
    '      listed="$listed$name/"\n'
    "      want_sha=$(field \"$obj\" sha256 '[0-9a-fA-F]*' | tr 'A-F' 'a-f')\n"
    "      want_size=$(field \"$obj\" size '[0-9][0-9]*')\n"
    "      epoch=$(field \"$obj\" epoch '[0-9][0-9]*')\n"
    "      created=$(field \"$obj\" created_at '[^\" ]*')\n"
    '      f="$ck/$name"\n'
    '      if [ ! -f "$f" ]; then\n'
    '        printf \'%s\\n\' "' + SECTION + 'entry missing ${epoch:--} - ${want_size:--} - ${created:--} $name"; continue\n'
    "      fi\n"
    '      size=$(wc -c < "$f" | tr -d " ")\n'
    '      mtime=$(date -r "$f" +%s 2>/dev/null || echo -)\n'
    '      if [ -n "$want_size" ] && [ "$size" != "$want_size" ]; then st=size\n'
    '      elif [ "$VERIFY" != 1 ]; then st=unverified\n'
    '      elif [ -z "$want_sha" ]; then st=nosha\n'
    "      else\n"
    '        got=$(hash_of "$f")\n'
    '        if [ -z "$got" ]; then st=unreadable\n'
    '        elif [ "$got" = "$want_sha" ]; then st=ok\n'
    "        else st=sha; fi\n"
    "      fi\n"
    '      printf \'%s\\n\' "' + SECTION + 'entry $st ${epoch:--} $size ${want_size:--} $mtime ${created:--} $name"\n'
    "    done <<RUNCTL_MANIFEST\n"
    "$entries\n"
    "RUNCTL_MANIFEST\n"
    "  fi\n"
    "  n=0\n"
    '  for f in "$ck"/*; do\n'
    '    [ -e "$f" ] || continue\n'
    "    name=${f##*/}\n"
    '    case "$name" in manifest.json|completed.json|*"$nl"*) continue ;; esac\n'
    '    case "$listed" in *"/$name/"*) continue ;; esac\n'
    '    if [ -d "$f" ]; then\n'
    "      kind=dir\n"
    "    else\n"
    f'      case "$name" in {CHECKPOINT_PATTERNS}) kind=file ;; *) continue ;; esac\n'
    "    fi\n"
    "    n=$((n + 1))\n"
    f'    [ "$n" -le {MAX_FILES_PER_RUN} ] || continue\n'
    '    if [ "$kind" = dir ]; then\n'
    '      kb=$(du -sk "$f" 2>/dev/null | cut -f1); size=$(( ${kb:-0} * 1024 ))\n'
    "    else\n"
    '      size=$(wc -c < "$f" | tr -d " ")\n'
    "    fi\n"
    '    printf \'%s\\n\' "' + SECTION + '$kind $size $(date -r "$f" +%s 2>/dev/null || echo -) $name"\n'
    "  done\n"
    f'  if [ "$n" -gt {MAX_FILES_PER_RUN} ]; then echo "' + SECTION + f'more $((n - {MAX_FILES_PER_RUN}))"; fi\n'
    "}\n"
    "runs_with_checkpoints() {  # newest first\n"
    '  ids=""\n'
    '  for d in "$RUNS"/*/; do\n'
    '    [ -d "$d" ] || continue\n'
    '    rid=$(basename "$d"); valid_id "$rid" || continue\n'
    '    if has_ckpt "$d"; then ids="$rid $ids"; fi\n'
    "  done\n"
    '  echo "$ids"\n'
    "}\n"
)


def _prelude(root: str, verify: bool) -> str:
    return header(root) + f"VERIFY={1 if verify else 0}\n" + _FUNCTIONS


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
            '  echo "' + s + 'norun $RUN"\n'
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
    return _prelude(root, verify) + f"{{\n{body}}} | head -c {OUTPUT_LIMIT}\nexit 0\n"


def list_all_checkpoints(root: str, verify: bool = True) -> str:
    """Every run directory that holds checkpoints, newest first."""
    body = 'for rid in $(runs_with_checkpoints); do list_run "$rid"; done\n'
    return _prelude(root, verify) + f"{{\n{body}}} | head -c {OUTPUT_LIMIT}\nexit 0\n"
