"""The example training repository the sandbox ships: a real git repo with the
example scripts (stdlib and PyTorch, with their shared protocol module), a script
with a syntax error, one that never checkpoints, runctl's examples script
(`examples/test_training_script.py`) and one that knows nothing of runctl (`plain_train.py`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Package data: in a checkout a link to the repository's training/, in a wheel a copy of its scripts.
TRAINING_DIR = Path(__file__).resolve().parent / "training"
# The example scripts import their protocol from the module beside them.
EXAMPLES = ("runctl_protocol.py", "train_with_checkpoints.py", "train_torch.py", "train_ddp.py")

# What the console's banner lists: each script the repository holds, and what it shows.
EXAMPLE_SCRIPTS: tuple[tuple[str, str], ...] = (
    ("train_with_checkpoints.py", "simulated training: progress, loss, a checkpoint each epoch, saves on SIGTERM"),
    ("train_torch.py", "the same protocol with PyTorch (needs torch on the instance)"),
    ("no_handler.py", "checkpoints once (epoch 3) and has no SIGTERM handler: a stop loses its progress"),
    ("no_checkpoints.py", "never checkpoints: what runctl says about a run with nothing to resume"),
    ("broken.py", "a syntax error: refused before it reaches an instance"),
)

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


# runctl's examples script: knows nothing of the protocol; saves ./checkpoints/checkpoint_epoch_N.json
# each epoch and ./checkpoints/final_checkpoint.json at the end (the final reply must name it).
EXAMPLES_SCRIPT = """import argparse, json, math, os, time

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--sleep", type=float, default=0.05)
a = p.parse_args()
os.makedirs("checkpoints", exist_ok=True)
print("Starting training...", flush=True)
for epoch in range(1, a.epochs + 1):
    time.sleep(a.sleep)
    loss = 2.0 * math.exp(-0.4 * epoch)
    print(f"Epoch {epoch}/{a.epochs} - loss: {loss:.4f} - accuracy: {1 - loss / 3:.4f}", flush=True)
    with open(f"checkpoints/checkpoint_epoch_{epoch}.json", "w") as f:
        json.dump({"epoch": epoch, "loss": loss}, f)
with open("checkpoints/final_checkpoint.json", "w") as f:
    json.dump({"epoch": a.epochs, "final": True}, f)
print("Training complete!", flush=True)
"""

# A script that knows nothing of runctl, as people write them: a tqdm-style bar redrawn with
# `\\r`, `epoch N/M ... val_loss=...` lines, ./checkpoints/epoch_N.pt, ./outputs/model_final.pt,
# and a W&B-style line naming another host (which must not become a link).
PLAIN_SCRIPT = """import math, os, sys, time

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
steps = 20
os.makedirs("checkpoints", exist_ok=True)
os.makedirs("outputs", exist_ok=True)
print("wandb: View run at https://evil.example/alice/mnist/runs/x1", flush=True)
print("wandb: 🚀 View run at https://wandb.ai/alice/mnist/runs/abc123", flush=True)
for epoch in range(1, epochs + 1):
    for step in range(1, steps + 1):
        loss = 1.0 / (epoch + step / steps)
        bar = "#" * (step * 10 // steps)
        done = step * 100 // steps
        rate = "[00:00<00:00, 99.0it/s"
        sys.stderr.write(f"\\rEpoch {epoch}: {done:3d}%|{bar:<10}| {step}/{steps} {rate}, loss={loss:.4f}]")
        sys.stderr.flush()
        time.sleep(0.002)
    sys.stderr.write("\\n")
    val = 1.2 / epoch + 0.01
    acc = 100 - 30 / epoch
    train = 1.0 / (epoch + 1)
    print(f"epoch {epoch}/{epochs} train_loss={train:.4f} val_loss={val:.4f} val_acc={acc:.1f}%", flush=True)
    with open(f"checkpoints/epoch_{epoch}.pt", "wb") as f:
        f.write(os.urandom(2048))
with open("outputs/model_final.pt", "wb") as f:
    f.write(os.urandom(4096))
print("done", flush=True)
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
    (dest / "examples").mkdir()
    (dest / "examples" / "test_training_script.py").write_text(EXAMPLES_SCRIPT)
    (dest / "plain_train.py").write_text(PLAIN_SCRIPT)
    (dest / "README.md").write_text("Example training code for the runctl sandbox.\n")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "example training code")
    return dest
