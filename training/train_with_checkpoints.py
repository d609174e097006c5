#!/usr/bin/env python3
"""Example training script that checkpoints atomically and reports its progress.

This is the reference job for runctl-bot: it simulates training a tiny model (a
list of floats whose loss goes down) with the standard library only. The
checkpoint, progress and stop protocols the bot relies on live in the sibling
module runctl_protocol.py (ship both files); training/README.md has the formats.

Exit codes: 0 finished or already complete; 1 unexpected error; 2 bad command
line; 3 the simulated failure of --fail-at-epoch; 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

from runctl_protocol import FORMAT_VERSION, CheckpointError, Job, as_float, as_floats, as_int, main

# runctl passes its `/runctl train --checkpoint-interval N` on to scripts that accept
# "--checkpoint-interval"; runctl_protocol.parse_args declares it with the other options.

# The simulated model: 512 weights and a bias fitted to fixed targets by SGD with
# momentum; per-step gradient noise is seeded by the global step so a resumed run
# produces exactly the same numbers as an uninterrupted one.
DIM = 512
LEARNING_RATE = 0.0005
MOMENTUM = 0.9
GRADIENT_NOISE = 0.05
INIT_SEED = 1234
TARGET_SEED = 5678


def _targets() -> tuple[list[float], float]:
    rng = random.Random(TARGET_SEED)
    return [rng.uniform(-1.0, 1.0) for _ in range(DIM)], rng.uniform(-1.0, 1.0)


TARGET_WEIGHTS, TARGET_BIAS = _targets()


@dataclass
class TrainState:
    """Everything a checkpoint holds: `epoch` completed epochs, `step` global steps."""

    epoch: int
    step: int
    weights: list[float]
    bias: float
    velocity: list[float]
    bias_velocity: float

    @classmethod
    def initial(cls, args: argparse.Namespace | None = None) -> TrainState:
        rng = random.Random(INIT_SEED)
        weights = [rng.uniform(-1.0, 1.0) for _ in range(DIM)]
        return cls(0, 0, weights, rng.uniform(-1.0, 1.0), [0.0] * DIM, 0.0)

    def snapshot(self) -> TrainState:
        return TrainState(
            self.epoch,
            self.step,
            list(self.weights),
            self.bias,
            list(self.velocity),
            self.bias_velocity,
        )

    def train_step(self) -> float:
        """One SGD-with-momentum step on a noisy quadratic; returns the loss before it."""
        self.step += 1
        rng = random.Random(self.step)
        total = 0.0
        for i in range(DIM):
            diff = self.weights[i] - TARGET_WEIGHTS[i]
            total += diff * diff
            self.velocity[i] = MOMENTUM * self.velocity[i] + 2.0 * diff
            self.velocity[i] += rng.gauss(0.0, GRADIENT_NOISE)
            self.weights[i] -= LEARNING_RATE * self.velocity[i]
        diff = self.bias - TARGET_BIAS
        total += diff * diff
        self.bias_velocity = MOMENTUM * self.bias_velocity + 2.0 * diff
        self.bias -= LEARNING_RATE * self.bias_velocity
        return total / (DIM + 1)

    def encode(self) -> bytes:
        """Compact JSON, about 20 KB."""
        payload = {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "model": {"weights": self.weights, "bias": self.bias},
            "optimizer": {
                "type": "sgd_momentum",
                "lr": LEARNING_RATE,
                "momentum": MOMENTUM,
                "velocity": self.velocity,
                "bias_velocity": self.bias_velocity,
            },
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    @classmethod
    def load(cls, data: bytes, args: argparse.Namespace | None = None) -> TrainState:
        """Rebuild a state from a checkpoint file's bytes; CheckpointError if malformed."""
        try:
            payload: Any = json.loads(data)
        except ValueError as exc:
            raise CheckpointError(f"invalid JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise CheckpointError("payload is not a JSON object")
        if payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"format_version is {payload.get('format_version')!r}")
        try:
            model, optimizer = payload["model"], payload["optimizer"]
            state = cls(
                epoch=as_int(payload["epoch"]),
                step=as_int(payload["step"]),
                weights=as_floats(model["weights"]),
                bias=as_float(model["bias"]),
                velocity=as_floats(optimizer["velocity"]),
                bias_velocity=as_float(optimizer["bias_velocity"]),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"missing or malformed field: {exc}") from exc
        if len(state.weights) != DIM or len(state.velocity) != DIM:
            raise CheckpointError("model has the wrong shape")
        if state.epoch < 1 or state.step < 0:
            raise CheckpointError("epoch/step out of range")
        return state


JOB = Job(
    description="Example training job with atomic checkpoints, resume and progress reporting.",
    suffix=".json",
    start=TrainState.initial,
    load=TrainState.load,
    steps_per_epoch=20,
    step_seconds=0.05,
)


if __name__ == "__main__":
    sys.exit(main(JOB))
