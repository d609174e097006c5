"""The example training repository the sandbox ships: a real git repo with the
example scripts (stdlib and PyTorch, with their shared protocol module), a script
with a syntax error, and one that never checkpoints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Package data: in a checkout a link to the repository's training/, in a wheel a copy of its scripts.
TRAINING_DIR = Path(__file__).resolve().parent / "training"
# The example scripts import their protocol from the module beside them.
EXAMPLES = ("runctl_protocol.py", "train_with_checkpoints.py", "train_torch.py", "train_ddp.py")

BROKEN = "import sys\n\ndef main(:\n    pass\n"
NO_CHECKPOINTS = (
    "import time\n\nfor epoch in range(1, 4):\n"
    "    time.sleep(0.2)\n    print(f'epoch {epoch}/3 loss={1 / epoch:.3f}', flush=True)\n"
)

# Checkpoints every 3rd epoch and reports progress, but has no SIGTERM handler: a stop kills it.
NO_HANDLER = """import json, os, sys, time

ck, progress = os.environ["RUNCTL_CHECKPOINT_DIR"], os.environ["RUNCTL_PROGRESS_FILE"]
epochs, steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100, 4
for epoch in range(1, epochs + 1):
    for step in range(steps):
        time.sleep(0.05)
        with open(progress + ".tmp", "w") as f:
            json.dump({"epoch": epoch, "total_epochs": epochs, "step": (epoch - 1) * steps + step + 1,
                       "total_steps": epochs * steps}, f)
        os.replace(progress + ".tmp", progress)
    print(f"epoch {epoch}/{epochs} done", flush=True)
    if epoch == 3:  # one checkpoint, early: a stop at any later epoch loses progress
        with open(os.path.join(ck, f"ckpt-epoch-{epoch:05d}.json"), "w") as f:
            json.dump({"epoch": epoch}, f)
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=runctl", "-c", "user.email=runctl@example.invalid", *args],
        check=True,
        capture_output=True,
    )


def make_example_repo(dest: Path) -> Path:
    """Create (or recreate) the repository at dest on branch main; returns dest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _git(dest, "init", "-q", "-b", "main")
    for name in EXAMPLES:
        shutil.copy(TRAINING_DIR / name, dest / name)
    (dest / "broken.py").write_text(BROKEN)
    (dest / "no_checkpoints.py").write_text(NO_CHECKPOINTS)
    (dest / "no_handler.py").write_text(NO_HANDLER)
    (dest / "README.md").write_text("Example training code for the runctl sandbox.\n")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "example training code")
    return dest
