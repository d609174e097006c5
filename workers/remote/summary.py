"""What a run did, read on its instance at the end (and for `/runctl chart`): one SSM command
that parses the whole training.log and the progress history into metric series (at most
~2,000 points, downsampled), the last and best value of each metric, the links the log
announces, and where the run's checkpoints and outputs are. The parser is a stdlib Python
program run by the run's own interpreter; the shell around it frames everything.

Output, one record a line (every instance-decided byte encoded: workers/remote/frame.py):

    ::runctl::summary <token>      zlib-compressed JSON from the parser (below), encoded
    ::runctl::nopython             no interpreter to parse with: no series, no metrics
    ::runctl::total <bytes> <files>  everything in the run's checkpoint and output places
    ::runctl::run ... entry/file/dir/manifest/more   the checkpoint listing (remote/checkpoints.py)
    ::runctl::end

The parser's JSON: ``{"series": {name: [[x, y, line], ...]}, "kinds": {name: "step"|"epoch"|"index"},
"metrics": {name: {"last": y, "best": y|null, "at": text, "best_at": text, "n": count}},
"links": [url, ...], "tb": [dir, ...], "lines": count}``. The worker trusts none of it: names and
links are escaped and checked there, numbers must be finite (`parse`).

Log formats the parser reads (README, "The end of a run"): `name=value` and `name: value`
pairs (`loss=0.12`, `val_loss: 0.4`, Keras' `loss: 0.2 - accuracy: 0.9`, Python dicts such as
Hugging Face's `{'loss': 0.5, 'epoch': 1.0}`), `acc 91.2%`, tqdm bars split by `\\r` with their
postfix (`... 50/50 [00:01<00:00, loss=0.123]`), `epoch N/M`, `Epoch N`, `step N`/`iter N`
for the x axis, and the progress protocol's history (`progress_history.jsonl`, sampled by the
wrapper from `progress.json`).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from datetime import datetime

from workers.remote import bounds, checkpoints, frame
from workers.remote.checkpoints import CheckpointListing
from workers.remote.shell import SECTION, interpreter, q

MAX_POINTS = 2000
# The summary token must leave room for the listing in SSM's 24,000 characters of output.
TOKEN_CHARS = 13_000
LISTING_CHARS = 8_000
SUMMARY_TIMEOUT = 300
MAX_JSON = 2_000_000  # decompressed: more is not ours

# The parser: stdlib only, Python 3.6+. argv: run dir, token budget, max points.
# Prints the zlib-compressed JSON as base64 on one line; the shell encodes that again.
PARSER = r"""
import base64, json, math, os, re, sys, zlib
run_dir, budget, max_points = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
NUM = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
PAIR = re.compile(r"(?<![\w./-])['\"]?([A-Za-z][A-Za-z0-9_./-]{0,48}?)['\"]?\s*(?:=|:)\s*(" + NUM + r")(\s*%)?(?![\w.:/])")
PCT = re.compile(r"(?<![\w./-])([A-Za-z][A-Za-z0-9_./-]{0,48})\s+(" + NUM + r")\s*%")
SPACED = re.compile(r"(?<![\w./-])((?:val|valid|validation|train|test|eval)?[_ ]?(?:loss|acc|accuracy|ppl|perplexity|f1|bleu|wer|cer))\s+(" + NUM + r")(?![\w.:/])", re.I)
EPOCH = re.compile(r"\bepoch\b['\"]?\s*[:=#]?\s*\[?\s*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?", re.I)
STEP = re.compile(r"\b(?:global_step|step|iter|iteration|it|batch)\b\s*[:=#]?\s*\[?\s*(\d+)(?:\s*/\s*(\d+))?", re.I)
TQDM = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")
URL = re.compile(r"https?://[^\s'\"<>`\\)\]}|]{4,600}")
TB = re.compile(r"(?:--logdir[= ]|tensorboard\S*\s+(?:log[_ ]?dir|logs?)\s*(?:at|to|in|:|=)?\s*)['\"]?([^\s'\"]{1,300})", re.I)
SKIP = set("epoch epochs step steps global_step iter iteration it batch batches v_num eta time elapsed date "
           "seed port pid rank world_size local_rank num_workers workers batch_size bs total n gpu gpus "
           "version id year month day hour minute second ms s sec secs samples tokens".split())
LOSSY = ("loss", "err", "ppl", "perplexity", "mae", "mse", "rmse", "wer", "cer", "nll", "distance")
ACCY = ("acc", "f1", "auc", "bleu", "rouge", "precision", "recall", "iou", "map", "score", "reward", "top1", "top5", "correct")
def kind(name):
    n = name.lower()
    if any(w in n for w in LOSSY):
        return "loss"
    if any(w in n for w in ACCY):
        return "acc"
    return ""
def finite(text):
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) and abs(v) <= 1e15 else None
series = {}   # name -> list of (x_step, x_epoch, y, line, seq)
links, tb = [], []
state = {"epoch": None, "step": None}
extremes = {}  # name -> [count, lowest point, highest point]: exact, whatever thinning drops
def add(name, y, step, epoch, line):
    pts = series.get(name)
    if pts is None:
        if len(series) >= 200:
            return  # a log naming thousands of "metrics" is not reporting metrics
        pts = series[name] = []
    ext = extremes.get(name)
    if len(pts) >= 100000:  # a log of millions of points: every other one and the extremes stay
        pts[:] = [q for i, q in enumerate(pts) if i % 2 or q is ext[1] or q is ext[2]]
    p = (step, epoch, y, line, ext[0] if ext else 0)  # its place among all of the name's points
    pts.append(p)
    if ext is None:
        extremes[name] = [1, p, p]
    else:
        ext[0] += 1
        if y < ext[1][2]:
            ext[1] = p
        if y > ext[2][2]:
            ext[2] = p
def scan(text, line):
    text = ANSI.sub("", text)
    if "http" in text:
        for u in URL.findall(text):
            u = u.rstrip(".,;:!'\"")
            if u not in links:
                links.append(u)
                del links[:-40]
    if "logdir" in text.lower() or "tensorboard" in text.lower():
        for d in TB.findall(text):
            if d not in tb:
                tb.append(d)
                del tb[:-5]
    if not any(c.isdigit() for c in text):
        return
    m = EPOCH.search(text)
    epoch = state["epoch"]
    if m:
        epoch = float(m.group(1))
        epoch = int(epoch) if epoch.is_integer() else epoch
        t = TQDM.search(text)
        if t and int(t.group(2)) > 0:  # inside epoch N's bar: N-1 and the bar's fraction
            epoch = epoch - 1 + int(t.group(1)) / float(int(t.group(2)))
        state["epoch"] = int(float(m.group(1)))
    s = STEP.search(text)
    step = None
    if s:
        step = int(s.group(1))
        state["step"] = step
    seen = set()
    for rx in (PAIR, PCT, SPACED):
        for found in rx.finditer(text):
            name = found.group(1).strip().replace(" ", "_")
            low = name.lower()
            if low in SKIP or low in seen or low.endswith(("_time", "/s", "it/s", "s/it")):
                continue
            y = finite(found.group(2))
            if y is None:
                continue
            seen.add(low)
            add(name[:64], y, step, epoch, line)
def read_log(path):
    n = 0
    try:
        f = open(path, "rb")
    except OSError:
        return 0
    with f:
        rest = b""
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            rest += chunk
            parts = re.split(rb"[\r\n]", rest)
            rest = parts.pop()
            if len(rest) > 65536:
                rest = rest[-4096:]
            for raw in parts:
                n += 1
                if raw:
                    scan(raw[:4096].decode("utf-8", "replace"), n)
        if rest:
            n += 1
            scan(rest[:4096].decode("utf-8", "replace"), n)
    return n
lines = read_log(os.path.join(run_dir, "training.log"))
history = {}
def read_history():
    rows = []
    for name in ("progress_history.jsonl", "progress.json"):
        try:
            with open(os.path.join(run_dir, name), "rb") as f:
                data = f.read(64 << 20)
        except OSError:
            continue
        for raw in (data.splitlines() if name.endswith("l") else [data.replace(b"\n", b" ")]):
            try:
                doc = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(doc, dict) and (not rows or rows[-1] != doc):
                rows.append(doc)
    for doc in rows:
        metrics = doc.get("metrics")
        if not isinstance(metrics, dict):
            continue
        def num(v):
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 1e15 else None
        step, epoch = num(doc.get("step")), num(doc.get("epoch"))
        for name, v in list(metrics.items())[:50]:
            y = num(v)
            if y is None or not isinstance(name, str) or not name:
                continue
            pts = history.setdefault(name[:64], [])
            pts.append((step, epoch, y, None, len(pts)))
read_history()
for name, pts in history.items():  # the protocol's own figures beat what the log says
    if len(pts) >= 3 or name not in series:
        series[name] = pts
        extremes[name] = [len(pts), min(pts, key=lambda p: p[2]), max(pts, key=lambda p: p[2])]
def useful(name, pts):
    if kind(name):
        return True
    return len(pts) >= 3 and len(set(p[2] for p in pts)) >= 2
names = [n for n in series if useful(n, series[n])]
names.sort(key=lambda n: (0 if kind(n) == "loss" else 1 if kind(n) == "acc" else 2, -len(series[n])))
names = names[:12]
def x_kind(pts):
    if all(p[0] is not None for p in pts) and len(set(p[0] for p in pts)) > 1:
        return "step"
    if all(p[1] is not None for p in pts) and len(set(p[1] for p in pts)) > 1:
        return "epoch"
    return "index"
def where(p):
    if p[0] is not None:
        return "step %d" % p[0]
    if p[1] is not None:
        e = p[1]
        if not float(e).is_integer():  # within a bar: the epoch it is in
            e = math.floor(e) + 1
        return "epoch %s" % int(e)
    return ""
def thin(pts, cap):
    if len(pts) <= cap:
        return pts
    buckets = max(1, cap // 2)
    size = len(pts) / float(buckets)
    out = [pts[0]]
    for b in range(buckets):
        part = pts[int(b * size):max(int((b + 1) * size), int(b * size) + 1)]
        lo = min(part, key=lambda p: p[2])
        hi = max(part, key=lambda p: p[2])
        for p in sorted({lo[4]: lo, hi[4]: hi}.values(), key=lambda p: p[4]):
            if p is not out[-1]:
                out.append(p)
    if out[-1] is not pts[-1]:
        out.append(pts[-1])
    return out
metrics, kinds = {}, {}
for n in names:
    pts = series[n]
    last = pts[-1]
    k = kind(n)
    count, low, high = extremes[n]
    best = None
    if k:
        best = low if k == "loss" else high
    metrics[n] = {"last": last[2], "at": where(last), "n": count,
                  "best": best[2] if best else None, "best_at": where(best) if best else ""}
    kinds[n] = x_kind(pts)
    if kinds[n] == "epoch" and min(p[1] for p in pts) < 0:  # bars of epochs counted from 0
        series[n] = pts = [(p[0], p[1] + 1, p[2], p[3], p[4]) for p in pts]
def encode(cap_total):
    per = max(10, cap_total // max(1, len(names)))
    out = {}
    for n in names:
        k = kinds[n]
        rows = []
        for p in thin(series[n], per):
            x = p[0] if k == "step" else p[1] if k == "epoch" else p[4]
            rows.append([x, float("%.6g" % p[2]), p[3]])
        out[n] = rows
    doc = {"series": out, "kinds": kinds, "metrics": metrics, "links": links[-20:], "tb": tb, "lines": lines}
    return base64.b64encode(zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9))
cap = max_points
blob = encode(cap)
while len(blob) > budget and cap > 20:
    cap //= 2
    blob = encode(cap)
sys.stdout.write(blob.decode() + "\n")
"""


def summary_script(root: str, run_id: str, owner_id: str, python: str = "") -> str:
    """One command: parse run `run_id`'s log and progress history, list the checkpoints and
    outputs of `owner_id` (the run whose directory it writes into: a resumed run's predecessor)."""
    s = SECTION
    py = interpreter(python) if python else "python3"
    budget = TOKEN_CHARS * 3 // 4  # the parser's base64 is encoded again by `enc`
    return (
        checkpoints.prelude(root, verify=False)
        + f"RUN_ID={q(run_id)}\nOWNER={q(owner_id)}\n"
        + 'RUN_DIR="$RUNS/$RUN_ID"\n'
        + f"PY={py}\n"
        + 'command -v "$PY" >/dev/null 2>&1 || PY=python3\n'
        + 'if command -v "$PY" >/dev/null 2>&1; then\n'
        + f'  out=$("$PY" -c {q(PARSER)} "$RUN_DIR" {budget} {MAX_POINTS} 2>/dev/null | head -c {budget + 10})\n'
        + f'  if [ -n "$out" ]; then echo "{s}summary $(printf \'%s\' "$out" | enc)"; else echo "{s}nopython"; fi\n'
        + "else\n"
        + f'  echo "{s}nopython"\n'
        + "fi\n"
        + "TOTAL_BYTES=0; TOTAL_FILES=0\n"
        + "count_dir() {\n"
        # Field 5 of `ls -ln` is the size, before any name: a name cannot shift it.
        + '  _t=$(find "$1" -type f -exec ls -ln {} + 2>/dev/null | awk \'{ s += $5; n += 1 } END { printf "%.0f %d\\n", s, n }\')\n'
        + "  TOTAL_BYTES=$((TOTAL_BYTES + ${_t% *})); TOTAL_FILES=$((TOTAL_FILES + ${_t#* }))\n"
        + "}\n"
        + 'if valid_id "$OWNER" && [ -d "$RUNS/$OWNER" ]; then\n'
        + '  each_dir count_dir "$OWNER"\n'
        + f'  echo "{s}total $TOTAL_BYTES $TOTAL_FILES"\n'
        + f"  list_run \"$OWNER\" | awk '{{ n += length($0) + 1; if (n > {LISTING_CHARS}) exit; print }}'\n"
        + "fi\n"
        + f'echo "{s}end"\n'
        + "exit 0\n"
    )


@dataclass(frozen=True)
class Metric:
    name: str
    last: float
    at: str  # "epoch 3", "step 120", or ""
    best: float | None
    best_at: str
    count: int

    @property
    def kind(self) -> str:
        return metric_kind(self.name)


@dataclass
class RunSummary:
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # candidates: the worker keeps only allowed hosts
    tensorboard_dirs: list[str] = field(default_factory=list)
    listing: CheckpointListing | None = None
    total_bytes: int | None = None
    total_files: int | None = None
    parsed: bool = False  # the parser ran (an interpreter was there)
    log_lines: int = 0

    def chartable(self) -> dict[str, list[tuple[float, float]]]:
        """Series with at least three points."""
        return {n: pts for n, pts in self.series.items() if len(pts) >= 3}


LOSSY = ("loss", "err", "ppl", "perplexity", "mae", "mse", "rmse", "wer", "cer", "nll", "distance")
ACCY = ("acc", "f1", "auc", "bleu", "rouge", "precision", "recall", "iou", "map", "score", "reward", "top1", "top5")


def metric_kind(name: str) -> str:
    """ "loss" (lower is better), "acc" (higher is better) or "" (neither: no best)."""
    low = name.lower()
    if any(w in low for w in LOSSY):
        return "loss"
    if any(w in low for w in ACCY):
        return "acc"
    return ""


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return bounds.finite(value)


def _text(value: object, limit: int = 64) -> str:
    return value[:limit] if isinstance(value, str) else ""


def parse(output: str) -> RunSummary:
    """The summary from the script's output; anything malformed is left out."""
    summary = RunSummary()
    lines = output.splitlines()
    listing_part: list[str] = []
    for line in lines:
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        rest = rest.strip()
        if word == "summary":
            _absorb(summary, rest)
        elif word == "total":
            parts = rest.split(" ")
            if len(parts) == 2:
                summary.total_bytes, summary.total_files = bounds.count(parts[0]), bounds.count(parts[1])
        elif word in ("run", "manifest", "entry", "file", "dir", "more"):
            listing_part.append(line)
    listings = checkpoints.parse("\n".join(listing_part) + "\n") if listing_part else []
    summary.listing = listings[0] if listings else None
    return summary


def _absorb(summary: RunSummary, token: str) -> None:
    raw = frame.decode(token)
    if raw is None:
        return
    try:
        inner = frame.decode("b" + raw.decode("ascii").strip())
        if inner is None:
            return
        unzip = zlib.decompressobj()
        text = unzip.decompress(inner, MAX_JSON)
        if unzip.unconsumed_tail:
            return  # bigger than any summary the parser writes
        doc = json.loads(text)
    except (UnicodeDecodeError, zlib.error, ValueError, RecursionError):
        return
    if not isinstance(doc, dict):
        return
    summary.parsed = True
    summary.log_lines = bounds.count(str(doc.get("lines", 0))) or 0
    kinds = doc.get("kinds") if isinstance(doc.get("kinds"), dict) else {}
    raw_series = doc.get("series")
    for name, rows in raw_series.items() if isinstance(raw_series, dict) else ():
        if not isinstance(name, str) or not name or not isinstance(rows, list):
            continue
        points: list[tuple[float, float]] = []
        for row in rows[: MAX_POINTS + 10]:
            if isinstance(row, list) and len(row) >= 2:
                x, y = _number(row[0]), _number(row[1])
                if x is not None and y is not None:
                    points.append((x, y))
        if points:
            summary.series[name[:64]] = points
            kind = kinds.get(name) if isinstance(kinds, dict) else None
            summary.kinds[name[:64]] = kind if kind in ("step", "epoch", "index") else "index"
    raw_metrics = doc.get("metrics")
    for name, m in raw_metrics.items() if isinstance(raw_metrics, dict) else ():
        if not isinstance(name, str) or not name or not isinstance(m, dict):
            continue
        last = _number(m.get("last"))
        if last is None:
            continue
        summary.metrics.append(
            Metric(
                name=name[:64],
                last=last,
                at=_text(m.get("at"), 32),
                best=_number(m.get("best")),
                best_at=_text(m.get("best_at"), 32),
                count=bounds.count(str(m.get("n", 0))) or 0,
            )
        )
    links = doc.get("links")
    summary.links = [u for u in (links if isinstance(links, list) else [])[:40] if isinstance(u, str) and len(u) <= 600]
    dirs = doc.get("tb")
    summary.tensorboard_dirs = [d for d in (dirs if isinstance(dirs, list) else [])[:5] if isinstance(d, str)]


def is_finite(value: float) -> bool:
    return math.isfinite(value)


def newest_at(listing: CheckpointListing | None) -> datetime | None:
    newest = listing.newest if listing else None
    return newest.modified_at if newest else None
