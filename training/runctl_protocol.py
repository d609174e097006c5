"""The checkpoint, progress and stop protocol that runctl-bot relies on, for any model.

Shipped beside the example scripts (`train_with_checkpoints.py`, stdlib only, and
`train_torch.py`, PyTorch), which import it as a sibling module: Python puts the
script's own folder first on `sys.path`. Copy this file next to your training
script and describe your model with a `Job`; training/README.md has the formats.

Only the standard library is needed; tqdm is used for a progress bar when it is
installed, stderr is a terminal and the run is longer than 5 epochs.

Exit codes: 0 finished or already complete; 1 unexpected error; 2 bad command
line; 3 the simulated failure of --fail-at-epoch; 128 + the signal number when a
SIGINT/SIGTERM stopped the run (130/143), after saving on the first signal and at
once on a second one, so that `train && evaluate` does not go on after a stop.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MARKER_NAME = "completed.json"
TMP_PREFIX = ".tmp-"

ENV_CHECKPOINT_DIR = "RUNCTL_CHECKPOINT_DIR"
ENV_CHECKPOINT_INTERVAL = "RUNCTL_CHECKPOINT_INTERVAL"
ENV_PROGRESS_FILE = "RUNCTL_PROGRESS_FILE"
ENV_RUN_ID = "RUNCTL_RUN_ID"
# Test hooks: sleep this long halfway through each durable (fsynced) temp-file write,
# optionally only for files whose name contains RUNCTL_TEST_SLOW_WRITE_MATCH.
ENV_SLOW_WRITE = "RUNCTL_TEST_SLOW_WRITE_SECONDS"
ENV_SLOW_WRITE_MATCH = "RUNCTL_TEST_SLOW_WRITE_MATCH"

MAX_QUIET_INTERVAL = 5  # larger checkpoint intervals print a warning
SUGGESTED_INTERVAL = 1
PROGRESS_MIN_SECONDS = 0.5  # per-step progress writes at most ~2x/s
TQDM_MIN_EPOCHS = 6

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SIMULATED_FAILURE = 3


class SimulatedFailure(RuntimeError):
    """Raised by --fail-at-epoch."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used to resume."""


# ---------------------------------------------------------------------------
# what a job provides


class Snapshot(Protocol):
    """The state at the end of an epoch: `epoch` completed epochs, `step` global steps."""

    epoch: int
    step: int

    def encode(self) -> bytes:
        """The checkpoint file's exact bytes."""
        ...


class Model(Snapshot, Protocol):
    """A model being trained; its epoch and step are advanced by the trainer and train_step."""

    def train_step(self) -> float:
        """One optimisation step (it increments `step`); returns the step's loss."""
        ...

    def snapshot(self) -> Snapshot:
        """A copy of the state now, unaffected by later steps (saved if a stop discards the epoch)."""
        ...


@dataclass(frozen=True)
class Job:
    """A training script: how to build, load and name its model's checkpoints."""

    description: str
    suffix: str  # checkpoint file suffix: ".json", ".pt"
    start: Callable[[argparse.Namespace], Model]  # a fresh model at epoch 0, step 0
    load: Callable[[bytes, argparse.Namespace], Model]  # CheckpointError if unusable
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    steps_per_epoch: int = 20
    step_seconds: float = 0.05
    # Distributed jobs (several ranks, e.g. under torchrun): `share` makes every rank start from
    # rank 0's model (rank 0 alone reads and writes checkpoints); `agree` turns this rank's wish
    # to stop into every rank's decision, once per step, so all ranks stop at the same step.
    share: Callable[[Model, argparse.Namespace], Model] | None = None
    agree: Callable[[bool], bool] | None = None


def rank() -> int:
    """This process's global rank (torchrun sets RANK); 0 when alone. Only rank 0 writes
    checkpoints, the manifest, the progress file and the completion marker."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


# ---------------------------------------------------------------------------
# small helpers


def utc_now() -> str:
    """ISO-8601 UTC timestamp with millisecond precision, e.g. 2024-05-01T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise TypeError(f"expected a finite number, got {value!r}")
    return result


def as_floats(value: Any) -> list[float]:
    if not isinstance(value, list):
        raise TypeError("expected a list of numbers")
    return [as_float(item) for item in value]


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def slow_write_seconds(name: str) -> float:
    raw = os.environ.get(ENV_SLOW_WRITE, "")
    if os.environ.get(ENV_SLOW_WRITE_MATCH, "") not in name:
        return 0.0
    try:
        return max(0.0, float(raw)) if raw else 0.0
    except ValueError:
        return 0.0


def atomic_write(path: Path, data: bytes, *, durable: bool, tmp_tag: str = "") -> None:
    """Write `data` to `path` so readers see either the old or the new content.

    The temp file `.tmp-<name>-<pid>[<tag>]` lives in the same directory, so the
    final os.replace is atomic. With `durable`, the file is fsynced before the
    rename and the directory after it (and the slow-write test hook applies).
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}{tmp_tag}")
    try:
        with open(tmp, "wb") as fh:
            pause = slow_write_seconds(path.name) if durable else 0.0
            if pause > 0:
                half = len(data) // 2
                fh.write(data[:half])
                fh.flush()
                time.sleep(pause)
                fh.write(data[half:])
            else:
                fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


# ---------------------------------------------------------------------------
# checkpoint store: files, manifest, resume, pruning

CHECKPOINT_NAME_RE = re.compile(r"^ckpt-epoch-(\d{5,})\.[A-Za-z0-9]+$")


@dataclass
class ManifestEntry:
    file: str
    sha256: str
    size: int
    epoch: int
    step: int
    created_at: str
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "epoch": self.epoch,
            "step": self.step,
            "created_at": self.created_at,
            "format_version": self.format_version,
        }

    @classmethod
    def from_json(cls, raw: Any) -> ManifestEntry:
        if not isinstance(raw, dict):
            raise TypeError("manifest entry is not an object")
        name = raw["file"]
        if not isinstance(name, str) or not CHECKPOINT_NAME_RE.match(name):
            raise TypeError(f"bad checkpoint file name {name!r}")
        sha = raw["sha256"]
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise TypeError(f"bad sha256 {sha!r}")
        created_at = raw.get("created_at", "")
        return cls(
            file=name,
            sha256=sha,
            size=as_int(raw["size"]),
            epoch=as_int(raw["epoch"]),
            step=as_int(raw["step"]),
            created_at=created_at if isinstance(created_at, str) else "",
            format_version=as_int(raw.get("format_version", FORMAT_VERSION)),
        )


@dataclass
class ResumePoint:
    model: Model
    path: Path


@dataclass
class CheckpointStore:
    directory: Path
    keep: int
    suffix: str
    parse: Callable[[bytes], Model]  # CheckpointError if unusable
    entries: list[ManifestEntry] = field(default_factory=list)  # oldest -> newest

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def name_of(self, epoch: int) -> str:
        return f"ckpt-epoch-{epoch:05d}{self.suffix}"

    def epoch_of(self, name: str) -> int | None:
        """The epoch in a checkpoint file name of this job's format, else None."""
        match = CHECKPOINT_NAME_RE.match(name)
        return int(match.group(1)) if match and name.endswith(self.suffix) else None

    def clean_stale_temp_files(self) -> None:
        """Remove temp files left by runs that were killed mid-write."""
        if rank() != 0:
            return
        for tmp in self.directory.glob(f"{TMP_PREFIX}*"):
            if tmp.is_file() and not tmp.name.endswith(f"-{os.getpid()}"):
                try:
                    tmp.unlink()
                    print(f"removed stale temp file {tmp}", file=sys.stderr, flush=True)
                except OSError:
                    pass

    # -- resume --------------------------------------------------------------

    def _read_manifest(self) -> list[ManifestEntry] | None:
        """Entries oldest -> newest, [] if there is no manifest, None if unreadable."""
        try:
            raw = json.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            warn(f"manifest {self.manifest_path} is unreadable ({exc})")
            return None
        try:
            if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
                raise TypeError("not a format_version 1 manifest")
            checkpoints = raw["checkpoints"]
            if not isinstance(checkpoints, list):
                raise TypeError("'checkpoints' is not a list")
            entries = [ManifestEntry.from_json(item) for item in checkpoints]
        except (KeyError, TypeError) as exc:
            warn(f"manifest {self.manifest_path} is unreadable ({exc})")
            return None
        return sorted(entries, key=lambda entry: entry.epoch)

    def _load_verified(self, entry: ManifestEntry) -> Model:
        path = self.directory / entry.file
        if entry.format_version != FORMAT_VERSION:
            raise CheckpointError(f"manifest format_version is {entry.format_version}")
        if entry.file != self.name_of(entry.epoch):
            raise CheckpointError(f"file name does not match epoch {entry.epoch}")
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointError("file is missing") from exc
        except OSError as exc:
            raise CheckpointError(f"cannot read it ({exc})") from exc
        if len(data) != entry.size:
            raise CheckpointError(f"size is {len(data)} bytes, manifest says {entry.size}")
        if sha256_hex(data) != entry.sha256:
            raise CheckpointError("sha256 does not match the manifest")
        model = self.parse(data)
        if model.epoch != entry.epoch:
            raise CheckpointError(f"holds epoch {model.epoch}, manifest says {entry.epoch}")
        return model

    def _scan(self) -> ResumePoint | None:
        """Fallback without a usable manifest: newest checkpoint file that parses."""
        found: list[tuple[int, Path]] = []
        for path in self.directory.iterdir():
            epoch = self.epoch_of(path.name)
            if epoch is not None and path.is_file():
                found.append((epoch, path))
        found.sort(reverse=True)
        valid: list[ManifestEntry] = []
        resume: ResumePoint | None = None
        for epoch, path in found:
            try:
                data = path.read_bytes()
                model = self.parse(data)
                if model.epoch != epoch:
                    raise CheckpointError(f"holds epoch {model.epoch}, not {epoch}")
            except (OSError, CheckpointError) as exc:
                warn(f"skipping checkpoint {path}: {exc}")
                continue
            if resume is None:
                resume = ResumePoint(model, path)
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            created = mtime.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            valid.append(ManifestEntry(path.name, sha256_hex(data), len(data), epoch, model.step, created))
        # The rebuilt manifest is written with the next checkpoint.
        self.entries = sorted(valid, key=lambda entry: entry.epoch)
        return resume

    def find_resume_point(self) -> ResumePoint | None:
        """Newest valid checkpoint; warns about each one skipped. Loads self.entries."""
        entries = self._read_manifest()
        has_files = any(self.epoch_of(p.name) is not None for p in self.directory.iterdir())
        if entries is None:
            warn(f"falling back to scanning {self.directory} for ckpt-epoch-*{self.suffix} files")
            return self._scan()
        if not entries:
            if has_files:
                if self.manifest_path.exists():
                    warn(f"manifest {self.manifest_path} lists no checkpoints")
                else:
                    warn(f"manifest {self.manifest_path} is missing")
                warn(f"falling back to scanning {self.directory} for ckpt-epoch-*{self.suffix} files")
                return self._scan()
            return None
        for index in range(len(entries) - 1, -1, -1):
            entry = entries[index]
            try:
                model = self._load_verified(entry)
            except CheckpointError as exc:
                warn(f"skipping checkpoint {self.directory / entry.file}: {exc}")
                continue
            self.entries = entries[: index + 1]
            if index + 1 < len(entries):
                self._write_manifest()  # drop the invalid newer entries right away
            return ResumePoint(model, self.directory / entry.file)
        warn(f"no valid checkpoint in {self.manifest_path}")
        warn(f"falling back to scanning {self.directory} for ckpt-epoch-*{self.suffix} files")
        return self._scan()

    # -- save ----------------------------------------------------------------

    def _write_manifest(self) -> None:
        # One entry per line so that shell tools can grep it; still plain JSON.
        lines = [json.dumps(entry.to_json()) for entry in self.entries]
        body = ",\n    ".join(lines)
        text = (
            f'{{"format_version": {FORMAT_VERSION}, "checkpoints": [\n    {body}\n]}}\n'
            if lines
            else f'{{"format_version": {FORMAT_VERSION}, "checkpoints": []}}\n'
        )
        atomic_write(self.manifest_path, text.encode(), durable=True)

    def save(self, snapshot: Snapshot) -> Path:
        """Write the checkpoint file, then the manifest, then prune old checkpoints (rank 0 only:
        another rank returns the path rank 0 writes)."""
        path = self.directory / self.name_of(snapshot.epoch)
        if rank() != 0:
            return path
        data = snapshot.encode()
        atomic_write(path, data, durable=True)
        entry = ManifestEntry(path.name, sha256_hex(data), len(data), snapshot.epoch, snapshot.step, utc_now())
        # Entries at or after this epoch belong to an abandoned (invalid) history.
        kept = [e for e in self.entries if e.epoch < snapshot.epoch] + [entry]
        self.entries = kept[-self.keep :]
        self._write_manifest()
        self._prune(snapshot.epoch)
        return path

    def _prune(self, saved_epoch: int) -> None:
        """Delete checkpoint files up to `saved_epoch` that the manifest no longer lists."""
        listed = {entry.file for entry in self.entries}
        for path in self.directory.iterdir():
            epoch = self.epoch_of(path.name)
            if epoch is not None and path.name not in listed and epoch <= saved_epoch:
                try:
                    path.unlink()
                except OSError as exc:
                    warn(f"could not delete old checkpoint {path}: {exc}")


# ---------------------------------------------------------------------------
# progress reporting


class Bar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def set_description(self, desc: str) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def make_bar(total_steps: int, initial_step: int, epochs: int) -> tuple[Bar, Any] | None:
    """(bar, tqdm class) when a bar should be shown instead of plain epoch lines."""
    if epochs < TQDM_MIN_EPOCHS or not sys.stderr.isatty():
        return None
    try:
        tqdm_cls: Any = importlib.import_module("tqdm").tqdm
    except ImportError:
        return None
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # A terminal without a window size (some docker/SSM ptys) reports 0x0, with
    # which tqdm draws nothing at all: fall back to a fixed size then.
    known = size.columns > 0 and size.lines > 0
    width: dict[str, Any] = {"dynamic_ncols": True} if known else {"ncols": 80, "nrows": 24}
    bar: Bar = tqdm_cls(total=total_steps, initial=initial_step, unit="step", file=sys.stderr, **width)
    return bar, tqdm_cls


@dataclass
class Progress:
    """Progress file writer plus the stdout/tqdm view."""

    path: Path | None
    total_epochs: int
    total_steps: int
    start_step: int
    started: float = field(default_factory=time.monotonic)
    last_write: float = -math.inf
    bar: Bar | None = None
    tqdm_cls: Any = None

    def say(self, line: str, *, err: bool = False) -> None:
        """A line on stdout (stderr with `err`) that does not garble the progress bar."""
        stream = sys.stderr if err else sys.stdout
        if self.tqdm_cls is not None:
            self.tqdm_cls.write(line, file=stream)
            stream.flush()
        else:
            print(line, file=stream, flush=True)

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        rate = (time.monotonic() - self.started) / done
        return round(max(0, self.total_steps - step) * rate, 1)

    def write(self, epoch: int, step: int, loss: float | None, *, force: bool) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_MIN_SECONDS:
            return
        self.last_write = now
        record = {
            "epoch": epoch,
            "total_epochs": self.total_epochs,
            "step": step,
            "total_steps": self.total_steps,
            "metrics": {} if loss is None else {"loss": loss},
            "eta_seconds": self.eta(step),
            "updated_at": utc_now(),
        }
        try:
            atomic_write(self.path, (json.dumps(record) + "\n").encode(), durable=False)
        except OSError as exc:
            warn(f"could not write progress file {self.path}: {exc}")

    def epoch_started(self, epoch: int) -> None:
        if self.bar is not None:  # the bar names the epoch in progress
            self.bar.set_description(f"epoch {epoch}/{self.total_epochs}")

    def step_done(self, epoch: int, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
        self.write(epoch, step, loss, force=False)

    def epoch_done(self, epoch: int, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.6f}")
        else:
            print(f"epoch {epoch}/{self.total_epochs} loss={loss:.6f}", flush=True)
        self.write(epoch, step, loss, force=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.tqdm_cls = None


# ---------------------------------------------------------------------------
# signals and the completion marker


class StopFlag:
    """First SIGINT/SIGTERM requests a graceful stop; a second one exits at once.

    With a progress bar on the terminal (`deferred`), the handler does not write:
    the trainer prints the notice through tqdm after the current step, so it never
    lands in the middle of the bar's line.
    """

    def __init__(self, force_exit: Callable[[int], None]) -> None:
        self.signum: int | None = None
        self.deferred = False
        self.announced = False
        self._force_exit = force_exit

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_status(self) -> int:
        return 128 + self.signum if self.signum is not None else EXIT_OK

    def notice(self) -> str:
        return f"received {self.name}, finishing the current step and saving (send it again to exit at once)"

    def install(self, ignore_sigterm: bool) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        # os.write: a buffered print could be re-entered from a signal handler.
        if self.signum is not None:
            start = "\n" if self.deferred else ""  # leave the bar's line whole
            os.write(2, f"{start}received second signal ({name}), exiting now without saving\n".encode())
            self._force_exit(128 + signum)
            return
        self.signum = signum
        if not self.deferred:
            os.write(2, (self.notice() + "\n").encode())
            self.announced = True


@dataclass
class Marker:
    path: Path

    def remove_stale(self) -> None:
        if rank() == 0:
            self.path.unlink(missing_ok=True)

    def write(
        self,
        exit_status: int,
        epoch: int,
        reason: str,
        checkpoint: str | None,
        *,
        tmp_tag: str = "",
    ) -> None:
        record: dict[str, Any] = {
            "exit_status": exit_status,
            "epoch": epoch,
            "finished_at": utc_now(),
            "reason": reason,
            "checkpoint": checkpoint,
        }
        if rank() != 0:
            return
        run_id = os.environ.get(ENV_RUN_ID)
        if run_id:
            record["run_id"] = run_id
        data = (json.dumps(record) + "\n").encode()
        try:
            atomic_write(self.path, data, durable=True, tmp_tag=tmp_tag)
        except OSError as exc:
            warn(f"could not write completion marker {self.path}: {exc}")


# ---------------------------------------------------------------------------
# the training run


@dataclass
class Config:
    epochs: int
    steps_per_epoch: int
    step_seconds: float
    checkpoint_interval: int
    checkpoint_dir: Path
    keep: int
    fail_at_epoch: int | None
    ignore_sigterm: bool
    progress_file: Path | None
    args: argparse.Namespace = field(default_factory=argparse.Namespace)


@dataclass
class Trainer:
    config: Config
    job: Job
    completed: Snapshot | None = None  # state at the end of the last completed epoch
    saved_path: Path | None = None  # checkpoint holding `completed`, if any
    store: CheckpointStore = field(init=False)
    marker: Marker = field(init=False)
    stop: StopFlag = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self.store = CheckpointStore(cfg.checkpoint_dir, cfg.keep, self.job.suffix, self._parse)
        self.marker = Marker(cfg.checkpoint_dir / MARKER_NAME)
        self.stop = StopFlag(self._force_exit)

    def _parse(self, data: bytes) -> Model:
        return self.job.load(data, self.config.args)

    @property
    def completed_epoch(self) -> int:
        return self.completed.epoch if self.completed is not None else 0

    def _force_exit(self, status: int) -> None:
        saved = self.saved_path.name if self.saved_path is not None else None
        # Own temp name: this may interrupt the normal marker write.
        self.marker.write(status, self.completed_epoch, "signal", saved, tmp_tag="-sig")
        os._exit(status)

    def _stopping(self) -> bool:
        """Whether to stop now: this rank's signal, or with `Job.agree` any rank's (a collective
        step: every rank calls it at the same points)."""
        wish = self.stop.signum is not None
        agreed = self.job.agree(wish) if self.job.agree is not None else wish
        if agreed and self.stop.signum is None:
            self.stop.signum = signal.SIGTERM  # a peer was told to stop: this rank stops with it
            self.stop.announced = True
        return agreed

    def run(self) -> int:
        cfg = self.config
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.marker.remove_stale()
        self.stop.install(cfg.ignore_sigterm)
        status, reason = EXIT_ERROR, "error"
        progress: Progress | None = None
        try:
            self.store.clean_stale_temp_files()
            started = self._start()
            if started is None:
                status, reason = EXIT_OK, "completed"
            else:
                progress, model = started
                reason = self._train(progress, model)
                status = self.stop.exit_status if reason == "signal" else EXIT_OK
        except SimulatedFailure:
            traceback.print_exc()
            status = EXIT_SIMULATED_FAILURE
        except Exception:
            traceback.print_exc()
            status = EXIT_ERROR
        finally:
            if progress is not None:
                progress.close()
            saved = self.saved_path.name if self.saved_path is not None else None
            self.marker.write(status, self.completed_epoch, reason, saved)
        return status

    def _start(self) -> tuple[Progress, Model] | None:
        """Resume if possible; None when training is already complete."""
        cfg = self.config
        resume = self.store.find_resume_point() if rank() == 0 or self.job.share is None else None
        if resume is None and rank() != 0 and self.job.share is not None:
            model = self.job.share(self.job.start(cfg.args), cfg.args)
            if model.epoch:
                self.completed = model.snapshot()
                print(f"rank {rank()}: resuming with rank 0 at epoch {model.epoch}", flush=True)
        elif resume is None:
            print(f"no checkpoint in {cfg.checkpoint_dir}, starting at epoch 1", flush=True)
            model = self.job.start(cfg.args)
        else:
            model = resume.model
            self.completed, self.saved_path = model.snapshot(), resume.path
            print(f"resuming from {resume.path} (epoch {model.epoch})", flush=True)
        if rank() == 0 and self.job.share is not None:
            model = self.job.share(model, cfg.args)
        if cfg.progress_file is not None:
            cfg.progress_file.parent.mkdir(parents=True, exist_ok=True)
        total_steps = model.step + max(0, cfg.epochs - model.epoch) * cfg.steps_per_epoch
        progress = Progress(cfg.progress_file if rank() == 0 else None, cfg.epochs, total_steps, model.step)
        if model.epoch >= cfg.epochs:
            print(
                f"training already complete: checkpoint epoch {model.epoch} >= --epochs {cfg.epochs}",
                flush=True,
            )
            progress.write(model.epoch, model.step, None, force=True)
            return None
        progress.write(model.epoch + 1, model.step, None, force=True)
        bar = make_bar(total_steps, model.step, cfg.epochs)
        if bar is not None:
            progress.bar, progress.tqdm_cls = bar
            self.stop.deferred = True
        return progress, model

    def _train(self, progress: Progress, model: Model) -> str:
        """Run the remaining epochs; returns the marker reason."""
        cfg = self.config
        for epoch in range(model.epoch + 1, cfg.epochs + 1):
            if self._stopping():
                break
            if cfg.fail_at_epoch is not None and epoch == cfg.fail_at_epoch:
                raise SimulatedFailure(f"simulated failure at the start of epoch {epoch}")
            loss = self._run_epoch(progress, model, epoch)
            if loss is None:
                break  # stopped mid-epoch: that partial epoch is discarded
            model.epoch = epoch
            self.completed, self.saved_path = model.snapshot(), None
            progress.epoch_done(epoch, model.step, loss)
            if epoch % cfg.checkpoint_interval == 0 or epoch == cfg.epochs:
                self._save(progress)
        if self.stop.signum is None:
            return "completed"
        self._announce(progress)
        self._save_on_signal(progress)
        return "signal"

    def _run_epoch(self, progress: Progress, model: Model, epoch: int) -> float | None:
        """Mean loss of the epoch, or None if a stop request interrupted it."""
        cfg = self.config
        progress.epoch_started(epoch)
        losses: list[float] = []
        for index in range(cfg.steps_per_epoch):
            loss = model.train_step()
            if cfg.step_seconds > 0:
                time.sleep(cfg.step_seconds)
            losses.append(loss)
            progress.step_done(epoch, model.step, loss)
            if self._stopping():
                self._announce(progress)
                if index + 1 < cfg.steps_per_epoch:
                    return None
        return sum(losses) / len(losses)

    def _announce(self, progress: Progress) -> None:
        if not self.stop.announced:
            self.stop.announced = True
            progress.say(self.stop.notice(), err=True)

    def _save(self, progress: Progress) -> None:
        assert self.completed is not None
        self.saved_path = self.store.save(self.completed)
        if rank() == 0:
            progress.say(f"checkpoint saved {self.saved_path} (epoch {self.completed.epoch})")

    def _save_on_signal(self, progress: Progress) -> None:
        name = self.stop.name
        if self.completed is None:
            progress.say(f"received {name}, no epoch completed yet: nothing new to save")
            return
        if self.saved_path is None:
            self.saved_path = self.store.save(self.completed)
        if rank() != 0:
            progress.say(f"received {name}, rank {rank()} stops with rank 0 (epoch {self.completed.epoch})")
            return
        progress.say(f"received {name}, checkpoint saved {self.saved_path} (epoch {self.completed.epoch})")


# ---------------------------------------------------------------------------
# command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def env_interval() -> int:
    raw = os.environ.get(ENV_CHECKPOINT_INTERVAL, "")
    try:
        return positive_int(raw) if raw else 1
    except (ValueError, argparse.ArgumentTypeError):
        warn(f"ignoring {ENV_CHECKPOINT_INTERVAL}={raw!r}: not a whole number >= 1")
        return 1


def parse_args(job: Job, argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=job.description)
    parser.add_argument("--epochs", metavar="N", type=positive_int, default=10, help="total epochs (10)")
    parser.add_argument(
        "--steps-per-epoch",
        metavar="N",
        type=positive_int,
        default=job.steps_per_epoch,
        help=f"default {job.steps_per_epoch}",
    )
    parser.add_argument(
        "--step-seconds",
        metavar="SECONDS",
        type=non_negative_float,
        default=job.step_seconds,
        help=f"extra sleep per step, simulated work ({job.step_seconds})",
    )
    parser.add_argument(
        "--checkpoint-interval",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"save every N epochs (default ${ENV_CHECKPOINT_INTERVAL}, else 1); the last epoch is always saved",
    )
    parser.add_argument(
        "--checkpoint-dir",
        metavar="PATH",
        type=Path,
        default=Path(os.environ.get(ENV_CHECKPOINT_DIR) or "checkpoints"),
        help=f"default: ${ENV_CHECKPOINT_DIR}, else ./checkpoints",
    )
    parser.add_argument("--keep", metavar="N", type=positive_int, default=3, help="checkpoints to keep (3)")
    parser.add_argument(
        "--progress-file",
        metavar="PATH",
        type=Path,
        default=None,
        help=f"progress JSON file; ${ENV_PROGRESS_FILE} takes precedence when set",
    )
    parser.add_argument(
        "--fail-at-epoch",
        metavar="N",
        type=positive_int,
        default=None,
        help="demo/test aid: exit 3 with a traceback at the start of epoch N",
    )
    parser.add_argument(
        "--ignore-sigterm",
        action="store_true",
        help="demo/test aid: ignore SIGTERM so that only SIGKILL stops the run",
    )
    job.add_arguments(parser)
    args = parser.parse_args(argv)
    env_progress = os.environ.get(ENV_PROGRESS_FILE)
    return Config(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        step_seconds=args.step_seconds,
        checkpoint_interval=args.checkpoint_interval or env_interval(),
        checkpoint_dir=args.checkpoint_dir,
        keep=args.keep,
        fail_at_epoch=args.fail_at_epoch,
        ignore_sigterm=args.ignore_sigterm,
        progress_file=Path(env_progress) if env_progress else args.progress_file,
        args=args,
    )


def main(job: Job, argv: Sequence[str] | None = None) -> int:
    config = parse_args(job, argv)
    if config.checkpoint_interval > MAX_QUIET_INTERVAL:
        warn(
            f"--checkpoint-interval {config.checkpoint_interval} can lose up to "
            f"{config.checkpoint_interval} epochs of work if the instance dies; for long runs "
            f"use a smaller interval, e.g. --checkpoint-interval {SUGGESTED_INTERVAL}"
        )
    return Trainer(config, job).run()
