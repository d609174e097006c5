"""GPUs through `nvidia-smi` where it exists: the busiest GPU for the idle clock, and
per-GPU utilisation and memory for the monitor's poll (one query, no extra command)."""

from __future__ import annotations

from workers.remote import bounds
from workers.remote.shell import SECTION, header
from workers.state.runs import Gpu

# nvidia-smi --help-query-gpu: utilization.gpu in %, memory.used/total in MiB with nounits.
QUERY = "index,utilization.gpu,memory.used,memory.total"
MAX_GPUS = 16  # a p4/p5 has 8; the batched poll's output is capped at 2,500 characters
MAX_MIB = 1e9  # memory figures beyond this are not a GPU's


def utilization(root: str) -> str:
    """Print `gpu <percent>` per GPU, or `gpu none` on an instance without nvidia-smi."""
    return header(root) + (
        "if ! command -v nvidia-smi >/dev/null 2>&1; then echo 'gpu none'; exit 0; fi\n"
        "nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null | tr -cd '0-9.\\n' |"
        " while read -r u; do printf 'gpu %s\\n' \"$u\"; done\n"
    )


def parse(stdout: str) -> float | None:
    """The busiest GPU's utilisation in percent; None without nvidia-smi (or without an answer)."""
    found: list[float] = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "gpu" and (value := bounds.finite(parts[1], 100.0)) is not None:
            found.append(value)
    return max(found) if found else None


def report() -> str:
    """Shell lines for the status poll (after frame.ENC): `::runctl::gpus <token>`, the
    `index, util, used, total` rows encoded, nothing at all where nvidia-smi is absent (a
    hung driver is cut off after 10 s)."""
    return (
        "if command -v nvidia-smi >/dev/null 2>&1; then\n"
        "  t=; if command -v timeout >/dev/null 2>&1; then t='timeout 10'; fi\n"
        f'  echo "{SECTION}gpus $($t nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits 2>/dev/null'
        f' | head -n {MAX_GPUS} | head -c 2000 | enc)"\n'
        "fi\n"
    )


def _number(text: str) -> float | None:
    return bounds.finite(text, MAX_MIB)  # None for "[N/A]", "[Not Supported]"


def parse_row(rest: str) -> Gpu | None:
    """One `index, util, used, total` row; None for anything else."""
    parts = [p.strip() for p in rest.split(",")]
    index = bounds.count(parts[0]) if len(parts) == 4 else None
    if index is None or index >= MAX_GPUS:
        return None
    used, total = (_number(p) for p in parts[2:])
    return Gpu(index=index, utilization=bounds.finite(parts[1], 100.0), memory_used_mib=used, memory_total_mib=total)
