"""Run the example training scripts (training/) as real subprocesses and read what they write.

Every wait polls a condition against a deadline; nothing relies on fixed sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

TRAINING = Path(__file__).resolve().parents[1] / "training"
SCRIPT = TRAINING / "train_with_checkpoints.py"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) loss=(\d+\.\d{6})$")
RESUME_LINE = re.compile(r"^resuming from (.+) \(epoch (\d+)\)$")
DEADLINE = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")}
    env.update(extra)
    return env


def run_script(
    *args: str, cwd: Path, env: dict[str, str] | None = None, script: Path = SCRIPT, timeout: float = DEADLINE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


class Run:
    """A running script whose stdout/stderr lines are collected by reader threads."""

    def __init__(
        self,
        *args: str,
        cwd: Path,
        env: dict[str, str] | None = None,
        script: Path = SCRIPT,
        deadline: float = DEADLINE,
    ) -> None:
        self.deadline = deadline
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=cwd,
            env=env if env is not None else clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        def check() -> bool:
            if condition():
                return True
            if self.proc.poll() is not None:
                for thread in self._threads:
                    thread.join(timeout=self.deadline)
                if condition():
                    return True
                pytest.fail(
                    f"process exited ({self.proc.returncode}) before {what}\n"
                    f"stdout: {self.stdout}\nstderr: {self.stderr}"
                )
            return False

        wait_until(check, what, self.deadline)

    def wait_for_line(self, pattern: str, *, stderr: bool = False) -> None:
        lines = self.stderr if stderr else self.stdout
        regex = re.compile(pattern)
        self.wait_for(lambda: any(regex.search(line) for line in list(lines)), repr(pattern))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self) -> int:
        try:
            code = self.proc.wait(timeout=self.deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"process did not exit\nstdout: {self.stdout}\nstderr: {self.stderr}")
        for thread in self._threads:
            thread.join(timeout=self.deadline)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def epochs_of(lines: list[str] | str) -> list[int]:
    if isinstance(lines, str):
        lines = lines.splitlines()
    return [int(m.group(1)) for line in lines if (m := EPOCH_LINE.match(line))]


def epoch_lines(lines: list[str] | str) -> list[str]:
    if isinstance(lines, str):
        lines = lines.splitlines()
    return [line for line in lines if EPOCH_LINE.match(line)]


def manifest(ckdir: Path) -> list[dict[str, Any]]:
    data = json.loads((ckdir / "manifest.json").read_text())
    assert data["format_version"] == 1
    entries: list[dict[str, Any]] = data["checkpoints"]
    return entries


def assert_valid_entry(
    ckdir: Path,
    entry: dict[str, Any],
    suffix: str = ".json",
    load: Callable[[bytes], Any] = json.loads,
    keys: frozenset[str] = frozenset({"format_version", "epoch", "step", "model", "optimizer"}),
) -> dict[str, Any]:
    """The manifest entry matches its file's exact bytes; returns the loaded checkpoint."""
    assert set(entry) == {"file", "sha256", "size", "epoch", "step", "created_at", "format_version"}
    data = (ckdir / entry["file"]).read_bytes()
    assert entry["file"] == f"ckpt-epoch-{entry['epoch']:05d}{suffix}"
    assert len(data) == entry["size"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert entry["format_version"] == 1
    payload: dict[str, Any] = load(data)
    assert payload["format_version"] == 1
    assert payload["epoch"] == entry["epoch"]
    assert payload["step"] == entry["step"]
    assert set(payload) == keys
    datetime.fromisoformat(entry["created_at"])
    return payload


def marker(ckdir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ckdir / "completed.json").read_text())
    return data


def resumed_epoch(stdout: str | list[str]) -> tuple[str, int]:
    lines = stdout.splitlines() if isinstance(stdout, str) else stdout
    for line in lines:
        if m := RESUME_LINE.match(line):
            return Path(m.group(1)).name, int(m.group(2))
    raise AssertionError(f"no 'resuming from' line in {lines}")
