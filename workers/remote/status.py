"""Parse the output of ``core.runs_status`` (the monitor's poll) into typed snapshots."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.remote import SECTION, bounds, frame, gpu
from workers.state.runs import Checkpoint, Gpu, Progress

_EPOCH = re.compile(r"epoch\s*[:=]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
# `loss=0.3`, `loss: 0.3`, `train_loss 0.3`, `val_acc=0.9`, `lr: 0.05` (Keras, tqdm postfixes, prints).
_METRIC = re.compile(
    r"\b([a-z_]*loss|[a-z_]*acc(?:uracy)?|lr)\s*[=:]?\s*([-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\b"
)


def _rank(name: str) -> int:
    """Loss-like metrics first (what a person watches), then accuracy, then the learning rate."""
    return 0 if "loss" in name else 1 if "acc" in name else 2


def _metrics(line: str) -> dict[str, float]:
    found = {m.group(1): value for m in _METRIC.finditer(line) if (value := bounds.finite(m.group(2))) is not None}
    return dict(sorted(found.items(), key=lambda item: _rank(item[0])))


_CKPT_EPOCH = re.compile(r"epoch[-_]?0*(\d+)", re.IGNORECASE)
MAX_EXIT = 2**31


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
    """Split ``runs_status`` output into one snapshot per run it reports. Only records
    count: whatever the instance wrote reaches here encoded (workers/remote/frame.py)."""
    now_line = ""
    gpus: list[Gpu] = []
    chunks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        if word == "now":
            now_line = line
        elif current is None and word == "gpus":
            rows = frame.text(rest)
            gpus = [row for r in (rows or "").splitlines() if (row := gpu.parse_row(r)) is not None]
        elif word == "run":
            current = chunks.setdefault(rest.strip(), [])
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
    progress: str | None = None
    for line in output.splitlines():
        if not line.startswith(SECTION):
            continue
        word, _, rest = line[len(SECTION) :].partition(" ")
        rest = rest.strip()
        if word == "missing":
            snap.missing = True
        elif word == "now":
            snap.instance_now = bounds.instant(rest)
        elif word == "alive":
            snap.alive = rest == "1"
        elif word == "pid":
            snap.has_pid = True
        elif word == "wrapper":
            snap.wrapper_alive = rest == "1"
        elif word == "exit":
            code = bounds.count(rest.removeprefix("-"))
            snap.exit_code = -1 if code is None or code > MAX_EXIT else (-code if rest.startswith("-") else code)
        elif word == "spot":
            at, _, notice = rest.partition(" ")
            when, said = bounds.instant(at), frame.text(notice)
            if when is not None and said is not None:
                snap.spot_notice, snap.spot_signalled_at = said.replace("\r", "").replace("\n", ""), when
        elif word == "checkpoint":
            snap.checkpoint = _checkpoint(rest)
        elif word == "progress":
            progress = frame.text(rest)
        elif word == "log":
            snap.log = (frame.text(rest) or "").splitlines()
    if progress:
        snap.progress = progress_from_file(progress)
    if snap.progress is None:
        snap.progress = progress_from_log(snap.log)
    return snap


def _checkpoint(rest: str) -> Checkpoint | None:
    parts = rest.split(" ")
    if len(parts) != 3:
        return None
    size, modified, name = bounds.count(parts[0]), bounds.instant(parts[1]), frame.text(parts[2])
    if size is None or modified is None or not name:
        return None
    match = _CKPT_EPOCH.search(name)
    return Checkpoint(name=name, size=size, modified_at=modified, epoch=bounds.count(match.group(1)) if match else None)


class _Fields(BaseModel):
    """What a progress file may say, each field checked on its own: out of bounds, it is dropped."""

    model_config = ConfigDict(allow_inf_nan=False)

    epoch: Annotated[int, Field(ge=0, le=bounds.MAX_COUNT)] | None = None
    total_epochs: Annotated[int, Field(ge=0, le=bounds.MAX_COUNT)] | None = None
    step: Annotated[int, Field(ge=0, le=bounds.MAX_COUNT)] | None = None
    total_steps: Annotated[int, Field(ge=0, le=bounds.MAX_COUNT)] | None = None
    eta_seconds: Annotated[float, Field(ge=0, le=bounds.MAX_SECONDS)] | None = None
    updated_at: datetime | None = None


def progress_from_file(text: str) -> Progress | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    fields: dict[str, object] = {}
    for key in _Fields.model_fields:
        if key in data:
            try:
                fields[key] = getattr(_Fields.model_validate({key: data[key]}), key)
            except ValidationError:
                continue  # this field only: the rest of the file still counts
    raw = data.get("metrics")
    metrics = {
        str(k): value
        for k, v in (raw.items() if isinstance(raw, dict) else ())
        if (value := bounds.finite(v) if isinstance(v, int | float) else None) is not None
    }
    if not metrics and all(fields.get(k) is None for k in ("epoch", "step", "eta_seconds")):
        return None  # nothing usable: the log may say more
    return Progress.model_validate({**fields, "metrics": metrics, "source": "file"})


def progress_from_log(lines: list[str]) -> Progress | None:
    """The newest `epoch N/M` line. With metrics on it, it reports epoch N done (`epoch 1/3
    loss=0.6`); without, it announces epoch N starting (Keras' `Epoch 1/8`), so N - 1 are
    done, and the metrics are those printed since (its progress lines)."""
    since: dict[str, float] = {}
    for line in reversed(lines):
        match = _EPOCH.search(line)
        if match:
            epoch, total = bounds.count(match.group(1)), bounds.count(match.group(2))
            if epoch is None or total is None:
                continue
            metrics = _metrics(line)
            done = epoch if metrics else max(0, epoch - 1)
            return Progress(epoch=epoch, total_epochs=total, done_epochs=done, metrics=metrics or since, source="log")
        if not since:
            since = _metrics(line)
    return None
