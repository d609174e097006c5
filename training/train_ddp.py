#!/usr/bin/env python3
"""Distributed example for runctl-bot: a small MLP trained with DistributedDataParallel under
torchrun (`/runctl train a,b train_ddp.py -- --epochs 5`), following the checkpoint, progress
and stop protocol of runctl_protocol.py (ship both files).

Every rank trains on its own shard of each step's batch; DDP averages the gradients, so the
parameters stay equal on every rank; each step prints the parameters' sha256 (`params rank R
step S <sha>`), which shows it. Rank 0 alone reads and writes the checkpoints (torch.save, as
train_torch.py) and the progress file; at the start it sends its state (a resumed one included)
to every other rank. A stop (SIGTERM from torchrun, which forwards it to every worker) is agreed
by all ranks after each step, so they stop at the same step and rank 0 saves.

Backend: nccl with CUDA, else gloo (CPU). `--fail-on-rank R --fail-at-step N` raises on rank R
at global step N (a test aid).

Exit codes: as train_torch.py (0, 1, 2, 3, 130/143).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from runctl_protocol import FORMAT_VERSION, CheckpointError, Job, as_int, main, non_negative_float, positive_int, rank
from torch import nn
from torch.nn.parallel import DistributedDataParallel

INPUTS = 8
INIT_SEED = 1234
DATA_SEED = 9012


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init() -> None:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shard(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the global batch of `step`: the same data whatever resumes where."""
    gen = torch.Generator().manual_seed(DATA_SEED + step)
    x = torch.randn(size * world(), INPUTS, generator=gen)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    part = slice(rank() * size, (rank() + 1) * size)
    return x[part], y[part]


@dataclass
class Saved:
    epoch: int
    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]

    def encode(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "format_version": FORMAT_VERSION,
                "epoch": self.epoch,
                "step": self.step,
                "model": self.model,
                "optimizer": self.optimizer,
            },
            buffer,
        )
        return buffer.getvalue()


class DdpModel:
    def __init__(self, args: argparse.Namespace, epoch: int = 0, step: int = 0) -> None:
        init()
        self.epoch, self.step = epoch, step
        self.args = args
        torch.manual_seed(INIT_SEED)
        self.module = nn.Sequential(nn.Linear(INPUTS, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=args.lr)
        self.net: nn.Module | None = None  # DDP wraps the module once the state is agreed

    def wrap(self) -> DdpModel:
        self.net = DistributedDataParallel(self.module)
        return self

    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.module.parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def train_step(self) -> float:
        assert self.net is not None
        self.step += 1
        if self.args.fail_on_rank == rank() and self.step == self.args.fail_at_step:
            raise RuntimeError(f"simulated failure on rank {rank()} at step {self.step}")
        x, y = shard(self.step, self.args.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss: Any = nn.functional.mse_loss(self.net(x), y)  # Any: mypy passes with or without torch installed
        loss.backward()
        self.optimizer.step()
        print(f"params rank {rank()} step {self.step} {self.digest()}", flush=True)
        return float(loss.item())

    def snapshot(self) -> Saved:
        return Saved(
            self.epoch, self.step, copy.deepcopy(self.module.state_dict()), copy.deepcopy(self.optimizer.state_dict())
        )

    def encode(self) -> bytes:
        return self.snapshot().encode()

    @classmethod
    def start(cls, args: argparse.Namespace) -> DdpModel:
        return cls(args)

    @classmethod
    def from_bytes(cls, data: bytes, args: argparse.Namespace) -> DdpModel:
        try:
            payload: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged archive
            raise CheckpointError(f"torch.load failed ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError("not a checkpoint of this format")
        try:
            model = cls(args, as_int(payload["epoch"]), as_int(payload["step"]))
            model.module.load_state_dict(payload["model"])
            model.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"missing or malformed state: {exc}") from exc
        return model

    @classmethod
    def load(cls, data: bytes, args: argparse.Namespace) -> DdpModel:
        model = cls.from_bytes(data, args)
        if model.epoch < 1:
            raise CheckpointError("epoch out of range")
        return model


def share(model: Any, args: argparse.Namespace) -> DdpModel:
    """Rank 0's state (fresh or resumed) to every rank, then wrap in DDP."""
    payload: list[Any] = [model.encode() if rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    mine: DdpModel = model if rank() == 0 else DdpModel.from_bytes(payload[0], args)
    return mine.wrap()


def agree(wish: bool) -> bool:
    """Stop if any rank was told to: every rank stops after the same step."""
    flag = torch.tensor([1 if wish else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", metavar="N", type=positive_int, default=16, help="hidden units (16)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=16, help="per-rank batch (16)")
    parser.add_argument("--lr", metavar="RATE", type=non_negative_float, default=0.05, help="learning rate (0.05)")
    parser.add_argument("--fail-on-rank", metavar="R", type=int, default=None, help="test aid: the rank that raises")
    parser.add_argument("--fail-at-step", metavar="N", type=positive_int, default=None, help="test aid: at that step")


JOB = Job(
    description="DistributedDataParallel example (torchrun) with rank-0 checkpoints, resume and progress.",
    suffix=".pt",
    start=DdpModel.start,
    load=DdpModel.load,
    add_arguments=add_arguments,
    steps_per_epoch=10,
    step_seconds=0.0,
    share=share,
    agree=agree,
)


if __name__ == "__main__":
    init()
    sys.exit(main(JOB))
