"""GPUs through `nvidia-smi` where it exists: the busiest GPU for the idle clock, and
per-GPU utilisation and memory for the monitor's poll (one query, no extra command)."""

from __future__ import annotations

from workers.remote.core import SECTION, header
from workers.state.runs import Gpu

# nvidia-smi --help-query-gpu: utilization.gpu in %, memory.used/total in MiB with nounits.
QUERY = "index,utilization.gpu,memory.used,memory.total"
MAX_GPUS = 16  # a p4/p5 has 8; the batched poll's output is capped at 2,500 characters


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


def report() -> str:
    """Shell lines for the status poll: `::runctl::gpu <index>, <util>, <used>, <total>` per GPU,
    nothing at all where nvidia-smi is absent (a hung driver is cut off after 10 s)."""
    return (
        "if command -v nvidia-smi >/dev/null 2>&1; then\n"
        "  t=; if command -v timeout >/dev/null 2>&1; then t='timeout 10'; fi\n"
        f"  $t nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits 2>/dev/null | head -n {MAX_GPUS} |"
        f" while IFS= read -r g; do printf '%s\\n' \"{SECTION}gpu $g\"; done\n"
        "fi\n"
    )


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_row(rest: str) -> Gpu | None:
    """One `index, util, used, total` row; None for anything else."""
    parts = [p.strip() for p in rest.split(",")]
    if len(parts) != 4 or not parts[0].isdigit():
        return None
    util, used, total = (_number(p) for p in parts[1:])
    return Gpu(index=int(parts[0]), utilization=util, memory_used_mib=used, memory_total_mib=total)
