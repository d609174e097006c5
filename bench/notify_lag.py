"""Benchmark 8: from a training's exit to its thread reply, with run events on and blocked.

Runs of several lengths at once (default 2 each of 30 s, 5 min and 20 min, scaled), each
on its own sandbox instance (moto + the shim, which really runs the wrapper under
/bin/sh), followed by the real monitor and run-event jobs in one in-process worker
(`InlineWorker`, as the Procfile's one `rq worker`), the real WSGI app (bot/web.py) on a
local port for `/runctl/events`, real Redis db 15 and the fake Slack Web API, which
timestamps every call. Two passes: events on (RUNCTL_EVENTS_URL names that app) and
blocked (it names a port that refuses connections: an instance with no route to the bot).

Figures, per pass:
- lag: the `exit_code` file's mtime (written by the wrapper as the training exits) to the
  successful `chat.postMessage` of the "finished" reply; p50 / p95 / max.
- parent staleness: sampled every second while a run is live, how long the parent message
  has been behind the instance (since the instance's progress file first showed an epoch
  newer than the one the parent shows; 0 when it is current); p95 and max.
- AWS calls (EC2, SSM, S3) made by the worker while following the runs (not the launches),
  per run-hour.

A third pass, "flood" (`--flood-rate R`, default 20; 0 skips it): one run of `--flood-length`
(default 600 s, scaled) with events on, while its instance posts R forged `exit` events a
second, signed with the run's key read from `runs/<id>/run.sh` (as anyone root there can),
from its start until its reply. Figures: the AWS calls per run-hour, the answers the forged
events got, and the real end's lag (raw: what holds it back is a hold in scaled time).

Scaling (`--scale S`, default 0.1): run lengths and the monitor's poll bounds
(RUNCTL_POLL_MIN/MAX_SECONDS, 5 / 240 s) are multiplied by S, so polling does what it
does for the real lengths, S times faster. Polling's lag, staleness and calls per run-hour
are therefore reported at real scale (lag and staleness ÷ S; run-hours ÷ S), and raw.
What events do takes wall-clock time that does not scale (a POST, a job, one poll; progress
events every RUNCTL_EVENTS_PROGRESS_SECONDS, 15 s), so events-on lag and staleness are raw.
`--scale 1` runs the real lengths (about 21 minutes a pass).

    python bench/notify_lag.py [--lengths 30,300,1200] [--per-length 2] [--scale 0.1]
                               [--flood-rate 20] [--flood-length 600] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/notify_lag.py`

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from tempfile import TemporaryDirectory
from typing import Any

from bench import harness
from bench.aws_calls import instances
from bot.web import wsgi
from runctl_sandbox.aws import Sandbox
from runctl_sandbox.example_repo import make_example_repo
from runctl_sandbox.fake_slack import Call, FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.ssm_agent import AGENT_PATH
from runctl_sandbox.web import WebServer
from workers import services
from workers.commands import Actor, TrainCommand
from workers.jobs.train import train
from workers.slack.ids import BlockId

ALICE = Actor(user_id="U0ALICE", channel_id="C0TRAIN")
EPOCH_SECONDS = 1.0  # the bench's training writes a new epoch every second: staleness is measured to 1 s
_EPOCH = re.compile(r"epoch (\d+)/")


@dataclass
class Tracked:
    run_id: str
    instance_id: str
    length: float  # seconds, scaled
    label: str  # the real length it stands for
    run_dir: Path
    seen: dict[int, float] = field(default_factory=dict)  # epoch -> when the instance first showed it (monotonic)
    launched: float = 0.0
    exited: float | None = None  # monotonic


def _progress_epoch(run_dir: Path) -> int | None:
    try:
        data = json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    epoch = data.get("epoch") if isinstance(data, dict) else None
    return epoch if isinstance(epoch, int) else None


def watch(runs: list[Tracked], stop: threading.Event, offset: float) -> None:
    """Record when each instance's progress file first shows each epoch, and when it exited."""
    while not stop.is_set():
        now = time.monotonic()
        for run in runs:
            if run.exited is not None:
                continue
            epoch = _progress_epoch(run.run_dir)
            if epoch is not None and epoch not in run.seen:
                run.seen[epoch] = now
            code = run.run_dir / "exit_code"
            if code.exists():
                run.exited = code.stat().st_mtime - offset
        stop.wait(0.1)


def _shown_epoch(call: Call) -> int | None:
    blocks: Any = call.params.get("blocks")
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    for block in blocks or []:
        if block.get("block_id") == BlockId.RUN_PROGRESS:
            match = _EPOCH.search(json.dumps(block))
            return int(match.group(1)) if match else None
    return None


def staleness(run: Tracked, calls: list[Call], parent_ts: str) -> list[float]:
    """Every second while the run was live: how long the parent had been behind the instance."""
    shown: list[tuple[float, int]] = []
    for call in calls:  # the parent's first post shows no progress yet: its updates do
        if call.error is None and call.method == "chat.update" and call.params.get("ts") == parent_ts:
            epoch = _shown_epoch(call)
            if epoch is not None:
                shown.append((call.at, epoch))
    end = run.exited or time.monotonic()
    start = min(run.seen.values(), default=end)
    ages: list[float] = []
    t = start + 1.0
    while t < end:
        current = max((e for at, e in shown if at <= t), default=0)
        newer = [at for e, at in run.seen.items() if e > current and at <= t]
        ages.append(t - min(newer) if newer else 0.0)
        t += 1.0
    return ages


def flood(run: Tracked, url: str, rate: float, stop: threading.Event, answers: Counter[int]) -> None:
    """Forged `exit` events for run, `rate` a second, signed with the key its run.sh holds."""
    key = None
    while key is None and not stop.is_set():
        with contextlib.suppress(OSError):
            key = re.search(r"^EV_KEY=([0-9a-f]{64})$", (run.run_dir / "run.sh").read_text(), re.M)
        stop.wait(0.05)
    while key is not None and not stop.is_set():
        event = {"run_id": run.run_id, "kind": "exit", "ts": int(time.time()), "nonce": secrets.token_hex(16)}
        body = json.dumps(event).encode()
        sig = "v1=" + hmac.new(key.group(1).encode(), b"v1:" + body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Runctl-Run": run.run_id, "X-Runctl-Signature": sig}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=5) as resp:
                answers[resp.status] += 1
        except urllib.error.HTTPError as exc:
            answers[exc.code] += 1
        except OSError:
            answers[0] += 1
        stop.wait(1 / rate)


class Counted:
    """AWS calls made by the worker threads (the monitor and event jobs), not by the launches."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.main = threading.main_thread()

    def __call__(self, model: Any, **_: Any) -> None:
        if threading.current_thread() is not self.main:
            self.calls[f"{model.service_model.service_name}:{model.name}"] += 1


def one_pass(
    box: Sandbox,
    slack: FakeSlack,
    tmp: Path,
    events: bool,
    lengths: dict[str, float],
    per_length: int,
    scale: float,
    flood_rate: float = 0.0,
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
    mode = "flood" if flood_rate else "events" if events else "blocked"
    forged: Counter[int] = Counter()
    with WebServer(wsgi(config, redis)) as web:
        config.RUNCTL_EVENTS_URL = web.events_url if events else web.blocked_url
        counter = Counted()
        for client in (svc.fleet.ec2, svc.fleet.ssm, svc.fleet.s3):
            client.meta.events.register("before-call.*.*", counter)
        services.install(svc)
        worker = InlineWorker(redis)
        stop = threading.Event()
        runs: list[Tracked] = []
        offset = time.time() - time.monotonic()
        watcher = threading.Thread(target=watch, args=(runs, stop, offset), daemon=True)
        try:
            worker.start(interval=0.05)
            ids = instances(box, len(lengths) * per_length)
            plan = [(label, length) for label, length in lengths.items() for _ in range(per_length)]
            watcher.start()
            for iid, (label, length) in zip(ids, plan, strict=True):
                epochs = max(1, round(length / EPOCH_SECONDS))
                args = ("--epochs", str(epochs), "--steps-per-epoch", "4", "--step-seconds", str(EPOCH_SECONDS / 4))
                run_id = f"r-lag-{uuid.uuid4().hex[:10]}"
                run_dir = box.instance_dir(iid) / "runs" / run_id
                runs.append(Tracked(run_id, iid, length, label, run_dir, launched=time.monotonic()))
                cmd = TrainCommand(instance_id=iid, script="train_with_checkpoints.py", args=args)
                train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
                if flood_rate:
                    threading.Thread(
                        target=flood, args=(runs[-1], web.events_url, flood_rate, stop, forged), daemon=True
                    ).start()
            deadline = time.monotonic() + max(lengths.values()) + 240 * scale + 120

            def reply_at(run: Tracked) -> float | None:
                for call in slack.calls_to("chat.postMessage"):
                    if (
                        call.error is None
                        and call.params.get("thread_ts")
                        and f"run `{run.run_id}` finished" in str(call.params.get("text", ""))
                    ):
                        return call.at
                return None

            replies: dict[str, float] = {}
            while len(replies) < len(runs) and time.monotonic() < deadline:
                for run in runs:
                    if run.run_id not in replies:
                        at = reply_at(run)
                        if at is not None:
                            replies[run.run_id] = at
                time.sleep(0.1)
        finally:
            stop.set()
            worker.stop()
            services.install(None)
    if len(replies) < len(runs):
        raise SystemExit(f"{mode}: only {len(replies)} of {len(runs)} runs were reported; see the run records")
    calls = slack.calls
    lags = [replies[r.run_id] - (r.exited or replies[r.run_id]) for r in runs]
    stale: list[float] = []
    for run in runs:
        record = svc.runs.get(run.run_id)
        if record is not None and record.message_ts:
            stale += staleness(run, calls, record.message_ts)
    run_hours = sum((r.exited or 0) - r.launched for r in runs) / 3600
    real = 1.0 if events else 1 / scale  # what polling does scales with the poll bounds
    figures: dict[str, harness.Figure] = {}
    for label in lengths:
        mine = [lag for lag, r in zip(lags, runs, strict=True) if r.label == label]
        name = f"{mode}_{label}_run"
        figures[f"{name}_lag_p50/p95/max_s"] = "/".join(
            f"{harness.percentile(mine, p) * real:.1f}" for p in (50, 95, 100)
        )
    figures[f"{mode}_lag_p50_s"] = round(harness.percentile(lags, 50) * real, 2)
    figures[f"{mode}_lag_p95_s"] = round(harness.percentile(lags, 95) * real, 2)
    figures[f"{mode}_lag_max_s"] = round(max(lags) * real, 2)
    if not events:
        figures[f"{mode}_lag_p95_s_raw"] = round(harness.percentile(lags, 95), 2)
    figures[f"{mode}_parent_staleness_p95_s"] = round(harness.percentile(stale, 95) * real, 1)
    figures[f"{mode}_parent_staleness_max_s"] = round(max(stale, default=0.0) * real, 1)
    total = sum(counter.calls.values())
    figures[f"{mode}_aws_calls"] = total
    figures[f"{mode}_aws_calls_per_run_hour"] = round(total / (run_hours / scale), 1)
    for name, count in sorted(counter.calls.items()):
        figures[f"{mode}_{name}"] = count
    if flood_rate:
        figures[f"{mode}_forged_exit_events"] = sum(forged.values())
        figures[f"{mode}_forged_answers"] = " ".join(f"{code}:{n}" for code, n in sorted(forged.items()))
    redis.flushdb()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "one 30 s and one 5 min run at scale 0.02, events on and blocked")
    parser.add_argument("--lengths", default="30,300,1200", help="real run lengths in seconds, comma-separated")
    parser.add_argument("--per-length", type=int, default=2, help="runs of each length, all at once")
    parser.add_argument("--scale", type=float, default=0.1, help="multiplies run lengths and poll bounds")
    parser.add_argument("--flood-rate", type=float, default=20, help="forged exit events a second in the flood pass")
    parser.add_argument("--flood-length", type=float, default=600, help="the flood pass's run, real seconds")
    args = parser.parse_args(argv)
    lengths_real = [30.0, 300.0] if args.smoke else [float(x) for x in args.lengths.split(",")]
    per_length = 1 if args.smoke else args.per_length
    scale = 0.02 if args.smoke else args.scale
    lengths = {f"{x:g}s": max(EPOCH_SECONDS * 2, x * scale) for x in lengths_real}
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per event
    figures: dict[str, harness.Figure] = {"scale": scale, "runs_per_pass": len(lengths) * per_length}
    with harness.sandbox() as box, harness.fake_slack() as slack, TemporaryDirectory(prefix="runctl-lag-") as tmp:
        for events in (True, False):
            figures.update(one_pass(box, slack, Path(tmp), events, lengths, per_length, scale))
        if args.flood_rate > 0:
            flooded = {f"{args.flood_length:g}s": max(EPOCH_SECONDS * 2, args.flood_length * scale)}
            figures.update(one_pass(box, slack, Path(tmp), True, flooded, 1, scale, args.flood_rate))
    harness.report(
        "notify_lag",
        figures,
        {"events_lag_p95_s": "≤ 5", "events_parent_staleness_max_s": "≤ 30", "events_aws_calls_per_run_hour": "≤ 60"},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
