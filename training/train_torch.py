#!/usr/bin/env python3
"""PyTorch example for runctl-bot: a small MLP that checkpoints with torch.save.

It fits a fixed random "teacher" function with AdamW and follows the same
checkpoint, progress and stop protocol as train_with_checkpoints.py, from the
sibling module runctl_protocol.py (ship both files): each checkpoint file
`ckpt-epoch-NNNNN.pt` is one `torch.save` of the model and optimizer state,
written atomically and listed in manifest.json with its sha256, size, epoch and
step; a run resumes from the newest valid one, and SIGTERM saves before exiting
143. See training/README.md.

    pip install torch && python3 train_torch.py --epochs 20

Exit codes: 0 finished or already complete; 1 unexpected error; 2 bad command
line; 3 the simulated failure of --fail-at-epoch; 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
from dataclasses import dataclass
from typing import Any

import torch
from runctl_protocol import FORMAT_VERSION, CheckpointError, Job, as_int, main, non_negative_float, positive_int
from torch import nn

# runctl passes its `/runctl train --checkpoint-interval N` on to scripts that accept
# "--checkpoint-interval"; runctl_protocol.parse_args declares it with the other options.

INPUTS = 16
INIT_SEED = 1234
TEACHER_SEED = 5678
DATA_SEED = 9012


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _teacher() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    return torch.randn(INPUTS, 8, generator=gen), torch.randn(8, 1, generator=gen)


TEACHER_IN, TEACHER_OUT = _teacher()


def batch(step: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a global step: the same in a resumed run as in an uninterrupted one."""
    gen = torch.Generator().manual_seed(DATA_SEED + step)
    x = torch.randn(size, INPUTS, generator=gen)
    y = torch.tanh(x @ TEACHER_IN) @ TEACHER_OUT + 0.01 * torch.randn(size, 1, generator=gen)
    return x.to(device), y.to(device)


@dataclass
class Saved:
    """A copy of the training state at the end of an epoch."""

    epoch: int
    step: int
    hidden: int
    model: dict[str, Any]
    optimizer: dict[str, Any]

    def encode(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "format_version": FORMAT_VERSION,
                "epoch": self.epoch,
                "step": self.step,
                "hidden": self.hidden,
                "model": self.model,
                "optimizer": self.optimizer,
            },
            buffer,
        )
        return buffer.getvalue()


class TorchModel:
    def __init__(self, args: argparse.Namespace, epoch: int = 0, step: int = 0) -> None:
        self.epoch, self.step = epoch, step
        self.hidden: int = args.hidden
        self.batch_size: int = args.batch_size
        self.device = pick_device(args.device)
        torch.manual_seed(INIT_SEED)
        self.net = nn.Sequential(nn.Linear(INPUTS, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        self.net.to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr)
        self.loss_fn = nn.MSELoss()

    def train_step(self) -> float:
        self.step += 1
        x, y = batch(self.step, self.batch_size, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def snapshot(self) -> Saved:
        # state_dict() holds references to the live tensors: copy them, or the next
        # steps would change a snapshot that a stop may still have to save.
        return Saved(
            self.epoch,
            self.step,
            self.hidden,
            copy.deepcopy(self.net.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )

    def encode(self) -> bytes:
        return self.snapshot().encode()

    @classmethod
    def start(cls, args: argparse.Namespace) -> TorchModel:
        return cls(args)

    @classmethod
    def load(cls, data: bytes, args: argparse.Namespace) -> TorchModel:
        """Rebuild model and optimizer from a checkpoint file's bytes; CheckpointError if unusable."""
        try:
            # weights_only: a checkpoint is data, never code to run.
            payload: Any = torch.load(io.BytesIO(data), map_location=pick_device(args.device), weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged archive
            raise CheckpointError(f"torch.load failed ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict):
            raise CheckpointError("payload is not a dict")
        if payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"format_version is {payload.get('format_version')!r}")
        if payload.get("hidden") != args.hidden:
            raise CheckpointError(f"saved with --hidden {payload.get('hidden')!r}, this run has {args.hidden}")
        try:
            epoch, step = as_int(payload["epoch"]), as_int(payload["step"])
            model = cls(args, epoch, step)
            model.net.load_state_dict(payload["model"])
            model.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"missing or malformed state: {exc}") from exc
        if epoch < 1 or step < 0:
            raise CheckpointError("epoch/step out of range")
        return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", metavar="N", type=positive_int, default=32, help="hidden units (32)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=64, help="batch size (64)")
    parser.add_argument("--lr", metavar="RATE", type=non_negative_float, default=0.01, help="learning rate (0.01)")
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")


JOB = Job(
    description="PyTorch example job with atomic torch.save checkpoints, resume and progress reporting.",
    suffix=".pt",
    start=TorchModel.start,
    load=TorchModel.load,
    add_arguments=add_arguments,
    steps_per_epoch=50,
    step_seconds=0.0,
)


if __name__ == "__main__":
    sys.exit(main(JOB))
