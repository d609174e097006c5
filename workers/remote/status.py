"""Parse the output of ``scripts.runs_status`` into typed snapshots."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workers.remote import SECTION, gpu
from workers.state.runs import Checkpoint, Gpu, Progress

_EPOCH = re.compile(r"epoch\s*[:=]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_METRIC = re.compile(r"\b(loss|acc|accuracy|val_loss|lr)\s*[=:]\s*([-+0-9.eE]+)")
_CKPT_EPOCH = re.compile(r"epoch[-_]?0*(\d+)", re.IGNORECASE)


@dataclass
class Snapshot:
    missing: bool = False
    alive: bool = False
    has_pid: bool = False
    wrapper_alive: bool = False
    exit_code: int | None = None
    instance_now: datetime | None = None
    progress: Progress | None = None
    checkpoint: Checkpoint | None = None
    log: list[str] = field(default_factory=list)
    gpus: list[Gpu] | None = None  # None: the instance has no nvidia-smi (or it did not answer)
    spot_notice: str = ""  # the interruption notice the wrapper acted on (IMDS's JSON)
    spot_signalled_at: datetime | None = None  # when it SIGTERMed the training for it

    @property
    def ended(self) -> bool:
        if self.exit_code is not None:
            return True
        return self.has_pid and not self.alive and not self.wrapper_alive


def parse_many(output: str) -> dict[str, Snapshot]:
    """Split ``runs_status`` output into one snapshot per run it reports."""
    now_line = ""
    gpus: list[Gpu] = []
    chunks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(SECTION + "now "):
            now_line = line
        elif current is None and line.startswith(SECTION + "gpu "):
            if (row := gpu.parse_row(line[len(SECTION) + 4 :])) is not None:
                gpus.append(row)
        elif line.startswith(SECTION + "run "):
            current = chunks.setdefault(line[len(SECTION) + 4 :].strip(), [])
        elif current is not None:
            current.append(line)
    found = {run_id: _parse_one("\n".join([now_line, *lines])) for run_id, lines in chunks.items()}
    for snap in found.values():
        snap.gpus = list(gpus) or None
    return found


def parse(output: str) -> Snapshot:
    """The snapshot of the one run a ``runs_status`` script reported (missing if none)."""
    found = parse_many(output)
    if not found:
        return Snapshot(missing=True)
    return next(iter(found.values()))


def _parse_one(output: str) -> Snapshot:
    snap = Snapshot()
    section = ""
    progress_lines: list[str] = []
    for line in output.splitlines():
        if line.startswith(SECTION):
            word, _, rest = line[len(SECTION) :].partition(" ")
            section = word
            if word == "missing":
                snap.missing = True
            elif word == "now" and rest.isdigit():
                snap.instance_now = datetime.fromtimestamp(int(rest), UTC)
            elif word == "alive":
                snap.alive = rest.strip() == "1"
            elif word == "pid":
                snap.has_pid = True
            elif word == "wrapper":
                snap.wrapper_alive = rest.strip() == "1"
            elif word == "exit":
                snap.exit_code = int(rest) if rest.strip().lstrip("-").isdigit() else -1
            elif word == "spot":
                at, _, notice = rest.strip().partition(" ")
                if at.isdigit():
                    snap.spot_notice, snap.spot_signalled_at = notice, datetime.fromtimestamp(int(at), UTC)
            elif word == "checkpoint":
                snap.checkpoint = _checkpoint(rest)
            continue
        if section == "progress":
            progress_lines.append(line)
        elif section == "log":
            snap.log.append(line)
    if progress_lines:
        snap.progress = progress_from_file("\n".join(progress_lines))
    if snap.progress is None:
        snap.progress = progress_from_log(snap.log)
    return snap


def _checkpoint(rest: str) -> Checkpoint | None:
    parts = rest.split(" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    match = _CKPT_EPOCH.search(parts[2])
    return Checkpoint(
        name=parts[2],
        size=int(parts[0]),
        modified_at=datetime.fromtimestamp(int(parts[1]), UTC),
        epoch=int(match.group(1)) if match else None,
    )


def progress_from_file(text: str) -> Progress | None:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            return None
        metrics = {
            str(k): float(v)
            for k, v in (data.get("metrics") or {}).items()
            if isinstance(v, int | float)
        }
        return Progress.model_validate({**data, "metrics": metrics, "source": "file"})
    except ValueError:
        return None


def progress_from_log(lines: list[str]) -> Progress | None:
    for line in reversed(lines):
        match = _EPOCH.search(line)
        if match:
            metrics = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(line)}
            return Progress(
                epoch=int(match.group(1)),
                total_epochs=int(match.group(2)),
                metrics=metrics,
                source="log",
            )
    return None
