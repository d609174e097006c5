"""The README's first command: the console demo drives a real run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_console_runs_a_training_to_the_end_with_checkpoints_on_disk(tmp_path: Path) -> None:
    script = (
        "/runctl help train\n"
        "/runctl train $gpu-box-1 train_with_checkpoints.py --epochs 2\n"
        "/runctl train $gpu-box-1 train_with_checkpoints.py -- --epochs 3 --steps-per-epoch 5 --step-seconds 0.3\n"
        "/wait\n"
        "/runctl status $gpu-box-1\n"
        "/wait\n"
        "/quit\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "runctl_sandbox.console", "--workdir", str(tmp_path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the missing `--` is refused with the corrected command
    assert "train_with_checkpoints.py -- --epochs 2" in out
    # queued -> started -> progress -> finished (a parent is updated at most every
    # RUNCTL_SLACK_UPDATE_SECONDS, 3 s, on the monitor's whole-second ticks: the run lasts 4.5 s)
    assert "Queued run `r" in out
    assert "*Running*" in out
    assert "epoch 1/3" in out or "epoch 2/3" in out
    assert "*Finished*" in out
    assert "finished (exit 0)" in out and "ckpt-epoch-00003.json" in out
    assert "No live run." in out and "Train lock: free" in out
    checkpoints = sorted(p.name for p in tmp_path.glob("aws/instances/*/runs/*/checkpoints/ckpt-epoch-*.json"))
    assert checkpoints == ["ckpt-epoch-00001.json", "ckpt-epoch-00002.json", "ckpt-epoch-00003.json"]
