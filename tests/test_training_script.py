"""End-to-end tests of training/train_with_checkpoints.py (and the runctl_protocol module
it shares with train_torch.py), run as real subprocesses.

Every wait polls a condition against a deadline; nothing relies on fixed sleeps.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .training import (
    DEADLINE,
    SCRIPT,
    Run,
    assert_valid_entry,
    clean_env,
    epoch_lines,
    epochs_of,
    manifest,
    marker,
    resumed_epoch,
    run_script,
    wait_until,
)

PROGRESS_KEYS = {
    "epoch",
    "total_epochs",
    "step",
    "total_steps",
    "metrics",
    "eta_seconds",
    "updated_at",
}


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Collects started runs and SIGKILLs any left running when a test fails."""
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


def start(runs: list[Run], *args: str, cwd: Path, env: dict[str, str] | None = None) -> Run:
    run = Run(*args, cwd=cwd, env=env)
    runs.append(run)
    return run


FAST = ("--steps-per-epoch", "3", "--step-seconds", "0")


def train(ckdir: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_script("--epochs", str(epochs), "--checkpoint-dir", str(ckdir), *FAST, *extra, cwd=ckdir.parent)
    assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------------------
# 1. kill -9 in the middle of a write


@pytest.mark.parametrize("target", ["ckpt-epoch-00003.json", "manifest.json"])
def test_kill9_during_write_keeps_previous_checkpoint(tmp_path: Path, runs: list[Run], target: str) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 2)
    before = manifest(ckdir)

    env = clean_env(RUNCTL_TEST_SLOW_WRITE_SECONDS="60", RUNCTL_TEST_SLOW_WRITE_MATCH=target)
    run = start(runs, "--epochs", "4", "--checkpoint-dir", str(ckdir), *FAST, cwd=tmp_path, env=env)
    tmp_file = ckdir / f".tmp-{target}-{run.proc.pid}"
    run.wait_for(lambda: tmp_file.exists() and tmp_file.stat().st_size > 0, f"{tmp_file}")
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL

    # The half-written temp file is there, but the committed state is untouched.
    assert tmp_file.exists()
    assert manifest(ckdir) == before
    assert [e["epoch"] for e in before] == [1, 2]
    for entry in before:
        assert_valid_entry(ckdir, entry)
    if target == "ckpt-epoch-00003.json":
        assert not (ckdir / target).exists()

    result = train(ckdir, 4)
    assert resumed_epoch(result.stdout) == ("ckpt-epoch-00002.json", 2)
    assert epochs_of(result.stdout) == [3, 4]
    assert "removed stale temp file" in result.stderr
    assert not list(ckdir.glob(".tmp-*"))
    entries = manifest(ckdir)
    assert [e["epoch"] for e in entries] == [2, 3, 4]
    for entry in entries:
        assert_valid_entry(ckdir, entry)


# ---------------------------------------------------------------------------
# 2. corrupt newest checkpoint


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_digit(path: Path) -> None:
    """Same size and still valid JSON: only the sha256 check can catch it."""
    data = bytearray(path.read_bytes())
    index = len(data) // 2
    while not chr(data[index]).isdigit():
        index += 1
    data[index] = ord("1") if data[index] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff" * (path.stat().st_size // 2))


@pytest.mark.parametrize("corrupt", [_truncate, _flip_digit, _garbage, Path.unlink], ids=lambda f: f.__name__)
def test_corrupt_newest_checkpoint_is_skipped(tmp_path: Path, corrupt: Callable[[Path], None]) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 3)
    corrupt(ckdir / "ckpt-epoch-00003.json")

    result = train(ckdir, 4)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert any("ckpt-epoch-00003.json" in line for line in warnings), result.stderr
    assert resumed_epoch(result.stdout) == ("ckpt-epoch-00002.json", 2)
    assert epochs_of(result.stdout) == [3, 4]
    entries = manifest(ckdir)
    assert [e["epoch"] for e in entries] == [2, 3, 4]
    for entry in entries:
        assert_valid_entry(ckdir, entry)


def test_two_corrupt_checkpoints_are_both_named(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 3)
    _truncate(ckdir / "ckpt-epoch-00003.json")
    _flip_digit(ckdir / "ckpt-epoch-00002.json")

    result = train(ckdir, 3)
    assert "ckpt-epoch-00003.json" in result.stderr
    assert "ckpt-epoch-00002.json" in result.stderr
    assert resumed_epoch(result.stdout) == ("ckpt-epoch-00001.json", 1)
    assert epochs_of(result.stdout) == [2, 3]


@pytest.mark.parametrize("manifest_damage", ["missing", "garbage"])
def test_unusable_manifest_falls_back_to_scanning(tmp_path: Path, manifest_damage: str) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 3)
    if manifest_damage == "missing":
        (ckdir / "manifest.json").unlink()
    else:
        (ckdir / "manifest.json").write_text('{"format_version": 1, "checkpoints": [')
    _truncate(ckdir / "ckpt-epoch-00003.json")

    result = train(ckdir, 4)
    assert "scanning" in result.stderr
    assert "ckpt-epoch-00003.json" in result.stderr
    assert resumed_epoch(result.stdout) == ("ckpt-epoch-00002.json", 2)
    assert epochs_of(result.stdout) == [3, 4]
    entries = manifest(ckdir)  # rebuilt
    assert [e["epoch"] for e in entries] == [2, 3, 4]
    for entry in entries:
        assert_valid_entry(ckdir, entry)


def test_fresh_directory_starts_at_epoch_one_without_warnings(tmp_path: Path) -> None:
    result = train(tmp_path / "ck", 2)
    assert "warning" not in result.stderr.lower()
    assert epochs_of(result.stdout) == [1, 2]


def test_already_complete_exits_zero(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 2)
    result = train(ckdir, 2)
    assert "already complete" in result.stdout
    assert epochs_of(result.stdout) == []
    assert marker(ckdir)["reason"] == "completed"
    assert marker(ckdir)["exit_status"] == 0
    result = train(ckdir, 3)
    assert epochs_of(result.stdout) == [3]


# ---------------------------------------------------------------------------
# 3./4. SIGTERM


def test_sigterm_saves_checkpoint_and_exits_143(tmp_path: Path, runs: list[Run]) -> None:
    ckdir = tmp_path / "ck"
    run = start(
        runs,
        *("--epochs", "100", "--steps-per-epoch", "10", "--step-seconds", "0.02"),
        *("--checkpoint-interval", "5", "--checkpoint-dir", str(ckdir)),
        cwd=tmp_path,
    )
    run.wait_for_line(r"^epoch 1/100 ")
    run.signal(signal.SIGTERM)
    assert run.finish() == 143  # 128 + SIGTERM: `train && evaluate` stops here

    last = max(epochs_of(run.stdout))
    saved = [line for line in run.stdout if line.startswith("received SIGTERM, checkpoint saved")]
    assert saved == [f"received SIGTERM, checkpoint saved {ckdir}/ckpt-epoch-{last:05d}.json (epoch {last})"]
    entries = manifest(ckdir)
    assert entries[-1]["epoch"] == last
    for entry in entries:
        assert_valid_entry(ckdir, entry)
    assert marker(ckdir) | {"finished_at": None} == {
        "exit_status": 143,
        "epoch": last,
        "finished_at": None,
        "reason": "signal",
        "checkpoint": f"ckpt-epoch-{last:05d}.json",
    }


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_before_first_epoch_has_nothing_to_save(
    tmp_path: Path, runs: list[Run], signum: int, status: int
) -> None:
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    run = start(
        runs,
        *("--epochs", "3", "--steps-per-epoch", "1000", "--step-seconds", "0.01"),
        *("--checkpoint-dir", str(ckdir), "--progress-file", str(progress)),
        cwd=tmp_path,
    )
    run.wait_for(progress.exists, "progress file")
    run.signal(signum)
    assert run.finish() == status
    name = signal.Signals(signum).name
    assert f"received {name}, no epoch completed yet: nothing new to save" in run.stdout
    assert not (ckdir / "manifest.json").exists()
    assert not list(ckdir.glob("ckpt-*"))
    assert marker(ckdir)["epoch"] == 0
    assert marker(ckdir)["exit_status"] == status
    assert marker(ckdir)["reason"] == "signal"
    assert marker(ckdir)["checkpoint"] is None


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_second_signal_exits_at_once_without_saving(tmp_path: Path, runs: list[Run], signum: int, status: int) -> None:
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    # Each step sleeps 30 s: only an immediate exit can finish within the deadline.
    run = start(
        runs,
        *("--epochs", "3", "--steps-per-epoch", "2", "--step-seconds", "30"),
        *("--checkpoint-dir", str(ckdir), "--progress-file", str(progress)),
        cwd=tmp_path,
    )
    run.wait_for(progress.exists, "progress file")
    run.signal(signum)
    run.wait_for_line(r"^received SIG(INT|TERM), finishing the current step", stderr=True)
    run.signal(signum)
    assert run.finish() == status
    assert not list(ckdir.glob("ckpt-*"))
    assert marker(ckdir)["exit_status"] == status
    assert marker(ckdir)["reason"] == "signal"


def test_interrupted_and_resumed_run_covers_each_epoch_once(tmp_path: Path, runs: list[Run]) -> None:
    epochs = 8
    args = ("--epochs", str(epochs), "--steps-per-epoch", "4", "--checkpoint-interval", "3")
    reference = run_script(*args, "--step-seconds", "0", "--checkpoint-dir", str(tmp_path / "ref"), cwd=tmp_path)
    assert reference.returncode == 0

    ckdir = tmp_path / "ck"
    first = start(runs, *args, "--step-seconds", "0.03", "--checkpoint-dir", str(ckdir), cwd=tmp_path)
    first.wait_for_line(rf"^epoch 2/{epochs} ")
    first.signal(signal.SIGTERM)
    assert first.finish() == 143
    second = run_script(*args, "--step-seconds", "0", "--checkpoint-dir", str(ckdir), cwd=tmp_path)
    assert second.returncode == 0, second.stderr

    done_first = epochs_of(first.stdout)
    assert done_first and max(done_first) < epochs
    assert any(line.startswith("received SIGTERM, checkpoint saved") for line in first.stdout)
    assert resumed_epoch(second.stdout)[1] == max(done_first)
    combined = epoch_lines(first.stdout) + epoch_lines(second.stdout)
    assert sorted(epochs_of(combined)) == list(range(1, epochs + 1))
    assert epochs_of(combined) == list(range(1, epochs + 1))
    # Partial-epoch work was discarded and the state restored exactly: the numbers
    # match an uninterrupted run bit for bit.
    assert combined == epoch_lines(reference.stdout)
    assert all(f"/{epochs} " in line for line in combined)


# ---------------------------------------------------------------------------
# 5. checkpoint interval warning


@pytest.mark.parametrize(("interval", "warned"), [(7, True), (5, False), (1, False)])
def test_large_checkpoint_interval_warns(tmp_path: Path, interval: int, warned: bool) -> None:
    result = train(tmp_path / "ck", 1, "--checkpoint-interval", str(interval))
    lines = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    if warned:
        assert len(lines) == 1
        assert "--checkpoint-interval 1" in lines[0]
        assert str(interval) in lines[0]
    else:
        assert lines == []
    # The last epoch is always saved whatever the interval.
    assert [e["epoch"] for e in manifest(tmp_path / "ck")] == [1]


def test_interval_saves_every_n_epochs_and_the_last(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    result = train(ckdir, 7, "--checkpoint-interval", "3", "--keep", "10")
    assert [e["epoch"] for e in manifest(ckdir)] == [3, 6, 7]
    saved = [line for line in result.stdout.splitlines() if line.startswith("checkpoint saved")]
    assert saved == [f"checkpoint saved {ckdir}/ckpt-epoch-{e:05d}.json (epoch {e})" for e in (3, 6, 7)]


# ---------------------------------------------------------------------------
# 6. progress file


def _check_progress(record: Any) -> None:
    assert set(record) == PROGRESS_KEYS
    assert record["total_epochs"] == 6
    assert record["total_steps"] == 60
    assert 1 <= record["epoch"] <= 6
    assert 0 <= record["step"] <= 60
    assert set(record["metrics"]) <= {"loss"}
    assert record["eta_seconds"] is None or record["eta_seconds"] >= 0
    datetime.fromisoformat(record["updated_at"])


def test_progress_file_is_always_valid_json(tmp_path: Path, runs: list[Run]) -> None:
    progress = tmp_path / "sub" / "progress.json"
    run = start(
        runs,
        *("--epochs", "6", "--steps-per-epoch", "10", "--step-seconds", "0.01"),
        *("--checkpoint-dir", str(tmp_path / "ck")),
        cwd=tmp_path,
        env=clean_env(RUNCTL_PROGRESS_FILE=str(progress)),
    )
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + DEADLINE
    while run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
        try:
            text = progress.read_text()
        except FileNotFoundError:
            continue
        record = json.loads(text)  # a torn write would raise here
        _check_progress(record)
        seen.append((record["epoch"], record["step"]))
    assert run.finish() == 0

    final = json.loads(progress.read_text())
    _check_progress(final)
    assert (final["epoch"], final["step"]) == (6, 60)
    assert final["eta_seconds"] == 0
    assert isinstance(final["metrics"]["loss"], float)
    assert len(seen) > 10
    assert seen == sorted(seen), "progress went backwards"
    assert {epoch for epoch, _ in seen} >= {1, 6}
    assert list(progress.parent.iterdir()) == [progress]  # no temp files left behind


def test_progress_file_option_and_env_precedence(tmp_path: Path) -> None:
    by_option = tmp_path / "option.json"
    result = train(tmp_path / "a", 2, "--progress-file", str(by_option))
    assert json.loads(by_option.read_text())["epoch"] == 2
    assert epochs_of(result.stdout) == [1, 2]

    by_env = tmp_path / "env.json"
    other = tmp_path / "ignored.json"
    result = run_script(
        *("--epochs", "2", *FAST, "--checkpoint-dir", str(tmp_path / "b")),
        *("--progress-file", str(other)),
        cwd=tmp_path,
        env=clean_env(RUNCTL_PROGRESS_FILE=str(by_env)),
    )
    assert result.returncode == 0
    assert json.loads(by_env.read_text())["step"] == 6
    assert not other.exists()


def test_resumed_progress_starts_at_checkpoint(tmp_path: Path) -> None:
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    train(ckdir, 2)
    result = run_script(
        *("--epochs", "4", "--steps-per-epoch", "3", "--step-seconds", "0"),
        *("--checkpoint-dir", str(ckdir), "--fail-at-epoch", "3", "--progress-file", str(progress)),
        cwd=tmp_path,
    )
    assert result.returncode == 3
    record = json.loads(progress.read_text())
    assert (record["epoch"], record["step"], record["total_steps"]) == (3, 6, 12)
    assert record["eta_seconds"] is None
    assert record["metrics"] == {}


# ---------------------------------------------------------------------------
# 7. completion marker


def test_stale_marker_removed_at_start(tmp_path: Path, runs: list[Run]) -> None:
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    ckdir.mkdir()
    (ckdir / "completed.json").write_text('{"stale": true}')
    run = start(
        runs,
        *("--epochs", "2", "--steps-per-epoch", "1000", "--step-seconds", "0.01"),
        *("--checkpoint-dir", str(ckdir), "--progress-file", str(progress)),
        cwd=tmp_path,
    )
    run.wait_for(progress.exists, "progress file")
    assert not (ckdir / "completed.json").exists()
    run.signal(signal.SIGTERM)
    assert run.finish() == 143
    assert marker(ckdir)["reason"] == "signal"


def test_marker_written_at_normal_end(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "completed.json").write_text('{"stale": true}')
    result = run_script(
        "--epochs",
        "3",
        *FAST,
        "--checkpoint-dir",
        str(ckdir),
        cwd=tmp_path,
        env=clean_env(RUNCTL_RUN_ID="run-42"),
    )
    assert result.returncode == 0
    data = marker(ckdir)
    datetime.fromisoformat(data.pop("finished_at"))
    assert data == {
        "exit_status": 0,
        "epoch": 3,
        "reason": "completed",
        "checkpoint": "ckpt-epoch-00003.json",
        "run_id": "run-42",
    }
    assert not list(ckdir.glob(".tmp-*"))


def test_fail_at_epoch(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    result = run_script(
        "--epochs",
        "4",
        *FAST,
        "--checkpoint-dir",
        str(ckdir),
        "--fail-at-epoch",
        "3",
        cwd=tmp_path,
    )
    assert result.returncode == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "SimulatedFailure: simulated failure at the start of epoch 3" in result.stderr
    assert epochs_of(result.stdout) == [1, 2]
    data = marker(ckdir)
    assert (data["exit_status"], data["reason"], data["epoch"]) == (3, "error", 2)
    assert "run_id" not in data

    result = train(ckdir, 4)
    assert resumed_epoch(result.stdout) == ("ckpt-epoch-00002.json", 2)
    assert epochs_of(result.stdout) == [3, 4]
    assert marker(ckdir)["exit_status"] == 0


# ---------------------------------------------------------------------------
# 8. pruning


def test_keep_prunes_files_and_manifest_entries(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    train(ckdir, 5, "--keep", "2")
    assert sorted(p.name for p in ckdir.glob("ckpt-epoch-*.json")) == [
        "ckpt-epoch-00004.json",
        "ckpt-epoch-00005.json",
    ]
    entries = manifest(ckdir)
    assert [e["epoch"] for e in entries] == [4, 5]
    assert [e["step"] for e in entries] == [12, 15]
    for entry in entries:
        assert_valid_entry(ckdir, entry)
        assert entry["size"] > 4096


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
def test_manifest_is_checkable_from_posix_sh(tmp_path: Path) -> None:
    """The bot verifies checkpoints on the instance with sh + grep + sha256sum."""
    ckdir = tmp_path / "ck"
    train(ckdir, 3)
    script = (
        'grep -o \'"file": "[^"]*", "sha256": "[0-9a-f]*"\' manifest.json'
        ' | sed \'s/"file": "\\([^"]*\\)", "sha256": "\\([0-9a-f]*\\)"/\\2  \\1/\''
        " | sha256sum -c -"
    )
    result = subprocess.run(["sh", "-c", script], cwd=ckdir, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": OK") == 3
    newest = subprocess.run(
        ["sh", "-c", "grep -o 'ckpt-epoch-[0-9]*\\.json' manifest.json | tail -n 1"],
        cwd=ckdir,
        capture_output=True,
        text=True,
        check=True,
    )
    assert newest.stdout.strip() == "ckpt-epoch-00003.json"


def test_default_checkpoint_dir_from_env_then_cwd(tmp_path: Path) -> None:
    env_dir = tmp_path / "from-env"
    result = run_script("--epochs", "1", *FAST, cwd=tmp_path, env=clean_env(RUNCTL_CHECKPOINT_DIR=str(env_dir)))
    assert result.returncode == 0
    assert (env_dir / "ckpt-epoch-00001.json").exists()
    result = run_script("--epochs", "1", *FAST, cwd=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / "checkpoints" / "ckpt-epoch-00001.json").exists()


# ---------------------------------------------------------------------------
# 9. --ignore-sigterm


def test_ignore_sigterm_keeps_running_until_sigkill(tmp_path: Path, runs: list[Run]) -> None:
    ckdir = tmp_path / "ck"
    run = start(
        runs,
        *("--epochs", "1000", "--steps-per-epoch", "5", "--step-seconds", "0.01"),
        *("--checkpoint-dir", str(ckdir), "--ignore-sigterm"),
        cwd=tmp_path,
    )
    run.wait_for_line(r"^epoch 1/1000 ")
    count = len(epochs_of(run.stdout))
    run.signal(signal.SIGTERM)
    run.wait_for(lambda: len(epochs_of(run.stdout)) >= count + 3, "epochs after SIGTERM")
    assert run.proc.poll() is None
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert not any("received" in line for line in run.stdout + run.stderr)
    assert not (ckdir / "completed.json").exists()  # SIGKILL leaves no marker


# ---------------------------------------------------------------------------
# progress bar on a terminal


def _run_with_tty_stderr(tmp_path: Path, epochs: int, size: tuple[int, int] | None) -> tuple[str, str, int]:
    master, slave = pty.openpty()
    if size is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--epochs",
            str(epochs),
            *FAST,
            "--checkpoint-dir",
            str(tmp_path / f"ck{epochs}"),
        ],
        cwd=tmp_path,
        env=clean_env(TERM="dumb"),
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=DEADLINE)
    finally:
        reader.join(timeout=DEADLINE)
        os.close(master)
    return stdout, b"".join(chunks).decode(errors="replace"), proc.returncode


@pytest.mark.parametrize("size", [(30, 100), None], ids=["sized", "0x0"])
def test_tqdm_bar_replaces_epoch_lines_on_a_terminal(tmp_path: Path, size: tuple[int, int] | None) -> None:
    pytest.importorskip("tqdm")
    stdout, terminal, code = _run_with_tty_stderr(tmp_path, 6, size)
    assert code == 0
    assert epochs_of(stdout) == []
    assert stdout.count("checkpoint saved") == 6
    assert "18/18" in terminal
    assert "epoch 6/6" in terminal

    stdout, terminal, code = _run_with_tty_stderr(tmp_path, 5, size)  # short run: plain lines
    assert code == 0
    assert epochs_of(stdout) == [1, 2, 3, 4, 5]
    assert "5/5" not in terminal


def screen_lines(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: `\\r` returns to the line's start and overwrites."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    for ch in raw:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line).rstrip())
    return lines


def test_tqdm_bar_names_the_epoch_in_progress_and_sigterm_notice_gets_its_own_line(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    ckdir, progress = tmp_path / "ck", tmp_path / "progress.json"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            *("--epochs", "8", "--steps-per-epoch", "40", "--step-seconds", "0.02"),
            *("--checkpoint-interval", "100", "--checkpoint-dir", str(ckdir), "--progress-file", str(progress)),
        ],
        cwd=tmp_path,
        env=clean_env(TERM="dumb"),
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:

        def in_epoch_3() -> bool:
            try:
                record = json.loads(progress.read_text())
            except (FileNotFoundError, ValueError):
                return False
            return bool(record["epoch"] == 3 and record["step"] > 80)

        wait_until(in_epoch_3, "a progress write in the middle of epoch 3")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=DEADLINE)
        os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")

    assert proc.returncode == 143
    notice = "received SIGTERM, finishing the current step and saving (send it again to exit at once)"
    assert notice in screen_lines(terminal), screen_lines(terminal)  # a whole line, not glued to the bar
    before = terminal[: terminal.index("received SIGTERM")]
    assert re.findall(r"epoch (\d+)/8", before)[-1] == "3"  # the bar names the epoch being trained
    assert "received SIGTERM, checkpoint saved" in stdout and "(epoch 2)" in stdout
