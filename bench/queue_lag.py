"""Benchmark: the queue's start lag, from one run's end to the next queued run's "running"
(issue 27), with run events on and blocked.

Per chain, one sandbox instance (moto + the shim, which really runs the wrapper under
/bin/sh): a live run started by `train`, then `--queue`d runs behind it (default 3), all
checked and queued through the real job (`workers.jobs.queued.add`). In-process RQ workers
(`InlineWorker`, each a real RQ `SimpleWorker` on its own thread) as the Procfile's pool runs
them at its defaults: two quick (runctl, runctl-events) and two long (runctl-long, then
runctl), each pair racing for the same jobs; real Redis (db 15), the fake Slack Web API, and the
real WSGI app (bot/web.py) on a local port for `/runctl/events`. Two passes: events on
(RUNCTL_EVENTS_URL names that app) and blocked (it names a port that refuses connections:
the end is found by the monitor's polling alone).

Figures, per pass:
- lag: the ended run's `exit_code` file mtime (written by the wrapper as its training
  exits) to the next run's `started_at` (set when its launch is confirmed and its message
  shows "running"); p50 / p95 / max over every handover.
- seen: the exit to the end recorded (`ended_at`: the end event's poll, or the monitor's);
  start: the end recorded to the next run's `started_at` (its start job: rights, the git
  mirror, EC2 and SSM checks, the locks, its parent message, the delivery through SSM). Raw.
- started_once / in_order: every queued run has exactly one parent message, and each started
  after the one before it ended (the correctness the lag is measured under).

Scaling (`--scale S`, default 0.1): the run length and the monitor's poll bounds
(RUNCTL_POLL_MIN/MAX_SECONDS, 5 / 240 s) are multiplied by S, so polling does what it does
for real lengths, S times faster; the blocked pass's lag is therefore reported at real scale
(÷ S) and raw. What events do takes wall-clock time that does not scale (a POST, a job, one
poll, the next run's start), so the events-on lag is raw.

    python bench/queue_lag.py [--chains 2] [--queued 3] [--length 120] [--scale 0.1] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/queue_lag.py`

import itertools
import logging
import shutil
import time
import uuid
from datetime import UTC, datetime
from tempfile import TemporaryDirectory

from bench import harness
from bench.aws_calls import instances
from bot.web import wsgi
from runctl_sandbox.aws import Sandbox
from runctl_sandbox.example_repo import make_example_repo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.ssm_agent import AGENT_PATH
from runctl_sandbox.web import WebServer
from workers import services
from workers.commands import Actor, TrainCommand
from workers.jobs import queued
from workers.jobs.train import train
from workers.queueing import EVENTS_QUEUE, LONG_QUEUE, QUEUE
from workers.state.runs import Run

PEOPLE = [Actor(user_id=f"U0Q{i}", channel_id="C0TRAIN") for i in range(10)]
EPOCH_SECONDS = 1.0


def one_pass(
    box: Sandbox, slack: FakeSlack, tmp: Path, events: bool, chains: int, depth: int, length: float, scale: float
) -> dict[str, harness.Figure]:
    redis = harness.bench_redis()
    slack.reset()
    python = "python3" if shutil.which("python3", path=AGENT_PATH) else sys.executable
    config = harness.settings(
        slack,
        RUNCTL_REPO=str(make_example_repo(tmp / f"repo-{uuid.uuid4().hex[:6]}")),
        RUNCTL_MIRROR_DIR=tmp / "mirror",
        RUNCTL_PYTHON=python,
        RUNCTL_POLL_MIN_SECONDS=5 * scale,
        RUNCTL_POLL_MAX_SECONDS=240 * scale,
    )
    svc = harness.services(config, redis, slack)
    mode = "events" if events else "blocked"
    epochs = max(2, round(length / EPOCH_SECONDS))
    args = ("--epochs", str(epochs), "--steps-per-epoch", "4", "--step-seconds", str(EPOCH_SECONDS / 4))
    chains_ids: list[tuple[str, list[str]]] = []
    with WebServer(wsgi(config, redis)) as web:
        config.RUNCTL_EVENTS_URL = web.events_url if events else web.blocked_url
        services.install(svc)
        # The Procfile's pool at its defaults: 2 quick workers (runctl, runctl-events) and 2 long
        # ones (runctl-long, then runctl); each pair races for the same jobs.
        quick, long = (QUEUE, EVENTS_QUEUE), (LONG_QUEUE, QUEUE)
        workers = [
            InlineWorker(redis, quick),
            InlineWorker(redis, quick),
            InlineWorker(redis, long),
            InlineWorker(redis, long),
        ]
        try:
            for w in workers:
                w.start(interval=0.05)
            for n, iid in enumerate(instances(box, chains)):
                cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
                first = f"r-ql-{uuid.uuid4().hex[:10]}"
                train(cmd.model_dump(mode="json"), PEOPLE[0].model_dump(mode="json"), first)
                ids = [first]
                for i in range(depth):
                    entry_id = f"q-ql-{n}-{i}-{uuid.uuid4().hex[:6]}"
                    who = PEOPLE[1 + i % (len(PEOPLE) - 1)]
                    queued.add(
                        cmd.model_copy(update={"queue": True}).model_dump(mode="json"),
                        who.model_dump(mode="json"),
                        entry_id,
                    )
                    ids.append(entry_id)
                chains_ids.append((iid, ids))
            every = [i for _, ids in chains_ids for i in ids]
            deadline = time.monotonic() + (depth + 1) * (length + 240 * scale + 60) + 60
            while time.monotonic() < deadline:
                runs = svc.runs.get_many(every)
                if len(runs) == len(every) and all(r.state.ended for r in runs.values()):
                    break
                time.sleep(0.2)
        finally:
            for w in workers:
                w.stop()
            services.install(None)
    runs = svc.runs.get_many([i for _, ids in chains_ids for i in ids])
    lags: list[float] = []
    seen: list[float] = []  # the exit to the end recorded (the end event or a poll)
    starts: list[float] = []  # the end recorded to the next run's running (its start job)
    in_order = True
    for iid, ids in chains_ids:
        chain = [runs.get(i) for i in ids]
        if any(r is None or r.started_at is None or not r.state.ended for r in chain):
            raise SystemExit(f"{mode}: a queued run on {iid} never started or ended: {[r and r.state for r in chain]}")
        for before, after in itertools.pairwise(chain):
            assert before is not None and after is not None and after.started_at is not None
            lags.append(after.started_at.timestamp() - exited_at(box, before))
            ended = (before.ended_at or after.started_at).timestamp()
            seen.append(ended - exited_at(box, before))
            starts.append(after.started_at.timestamp() - ended)
            in_order = in_order and after.started_at >= (before.ended_at or datetime.max.replace(tzinfo=UTC))
    parents = [m for m in slack.messages("C0TRAIN") if m.thread_ts is None]
    once = all(sum(1 for m in parents if f"({i})" in m.text) == 1 for _, ids in chains_ids for i in ids)
    real = 1.0 if events else 1 / scale
    figures: dict[str, harness.Figure] = {
        f"{mode}_handovers": len(lags),
        f"{mode}_lag_p50_s": round(harness.percentile(lags, 50) * real, 2),
        f"{mode}_lag_p95_s": round(harness.percentile(lags, 95) * real, 2),
        f"{mode}_lag_max_s": round(max(lags, default=0.0) * real, 2),
        f"{mode}_seen_p50_s": round(harness.percentile(seen, 50) * real, 2),
        f"{mode}_start_p50_s": round(harness.percentile(starts, 50), 2),
        f"{mode}_start_p95_s": round(harness.percentile(starts, 95), 2),
        f"{mode}_started_once": once,
        f"{mode}_in_order": in_order,
    }
    if not events:
        figures[f"{mode}_lag_p95_s_raw"] = round(harness.percentile(lags, 95), 2)
    return figures


def exited_at(box: Sandbox, run: Run) -> float:
    """When the training exited: the wrapper writes `exit_code` as it does."""
    return (box.instance_dir(run.instance_id) / "runs" / run.run_id / "exit_code").stat().st_mtime


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "one chain of a run and 2 queued, 30 s runs at scale 0.05, both passes")
    parser.add_argument("--chains", type=int, default=2, help="instances, each with a live run and its queue")
    parser.add_argument("--queued", type=int, default=3, help="runs queued behind each live run")
    parser.add_argument("--length", type=float, default=120, help="each run's real length, seconds")
    parser.add_argument("--scale", type=float, default=0.1, help="multiplies the run length and the poll bounds")
    args = parser.parse_args(argv)
    chains, depth = (1, 2) if args.smoke else (args.chains, args.queued)
    scale = 0.05 if args.smoke else args.scale
    length = max(EPOCH_SECONDS * 2, (30 if args.smoke else args.length) * scale)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    figures: dict[str, harness.Figure] = {"scale": scale, "chains": chains, "queued_per_chain": depth}
    with harness.sandbox() as box, harness.fake_slack() as slack, TemporaryDirectory(prefix="runctl-ql-") as tmp:
        for events in (True, False):
            figures.update(one_pass(box, slack, Path(tmp), events, chains, depth, length, scale))
    harness.report("queue_lag", figures, {"events_lag_p95_s": "≤ 5"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
