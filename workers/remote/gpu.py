"""GPU utilisation for the training-aware idle clock: `nvidia-smi` where it exists."""

from __future__ import annotations

from workers.remote.core import header


def utilization(root: str) -> str:
    """Print `gpu <percent>` per GPU, or `gpu none` on an instance without nvidia-smi."""
    return header(root) + (
        "if ! command -v nvidia-smi >/dev/null 2>&1; then echo 'gpu none'; exit 0; fi\n"
        "nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null |"
        " while read -r u; do printf 'gpu %s\\n' \"$u\"; done\n"
    )


def parse(stdout: str) -> float | None:
    """The busiest GPU's utilisation in percent; None without nvidia-smi (or without an answer)."""
    found: list[float] = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "gpu":
            try:
                found.append(float(parts[1]))
            except ValueError:
                continue
    return max(found) if found else None
