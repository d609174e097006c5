"""A stand-in for torchrun (`python -m torch.distributed.run`) for tests without PyTorch: it
accepts torchrun's options and runs the script in this process as the node's one worker
(RANK = node rank, WORLD_SIZE = nodes), with no rendezvous. The real one is in
tests/test_multinode_torch.py."""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--nnodes", "--node-rank", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"):
        parser.add_argument(name)
    for name in ("--rdzv-conf", "--local-addr", "--max-restarts"):
        parser.add_argument(name)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    os.environ.update(
        RANK=str(ns.node_rank), LOCAL_RANK="0", WORLD_SIZE=str(ns.nnodes), TORCHELASTIC_RUN_ID=str(ns.rdzv_id)
    )
    print(f"torchstub: node rank {ns.node_rank} of {ns.nnodes}, rendezvous {ns.rdzv_endpoint}", flush=True)
    sys.argv = [ns.script, *ns.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
    runpy.run_path(ns.script, run_name="__main__")


if __name__ == "__main__":
    main()
