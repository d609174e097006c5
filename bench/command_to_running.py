"""Benchmark 2: from the POST of `/runctl train` to the parent message saying the run is running.

The real `web` process (gunicorn, as in the Procfile) and the real `worker`
process (`rq worker --with-scheduler`), against real Redis db 15, the sandbox
(moto + the shim, which really launches the training script under /bin/sh) and
a fake Slack Web API that timestamps every call. Runs take turns on the three
running sandbox instances; each is waited out before its instance is reused.

RUNCTL_LAUNCH_CHECK_SECONDS keeps its default (2 s): that wait comes after the
message already says running, so it is not in the figure.

    python bench/command_to_running.py [-n 20] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/command_to_running.py`

import json
import os
import re
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from tempfile import TemporaryDirectory
from urllib.parse import urlencode

from slack_sdk.signature import SignatureVerifier

from bench import harness
from bench.ack_latency import free_port, procfile_web
from runctl_sandbox.aws import Sandbox, seed
from runctl_sandbox.example_repo import make_example_repo
from runctl_sandbox.fake_slack import FakeSlack
from workers.state.runs import RunState

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "train_with_checkpoints.py -- --epochs 1 --steps-per-epoch 1 --step-seconds 3"


@contextmanager
def processes(box: Sandbox, slack: FakeSlack, tmp: Path, worker_class: str | None) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **box.env(),
        "SLACK_BOT_TOKEN": harness.TOKEN,
        "SLACK_SIGNING_SECRET": harness.SECRET,
        "SLACK_API_URL": slack.base_url,
        "REDIS_URL": harness.REDIS_URL,
        "RUNCTL_REPO": str(make_example_repo(tmp / "training-code")),
        "RUNCTL_S3_BUCKET": harness.BUCKET,
        "RUNCTL_MIRROR_DIR": str(tmp / "mirror"),
        "RUNCTL_CHANNEL": "C0TRAIN",
        "RUNCTL_POLL_MIN_SECONDS": "1",  # only so a finished run frees its instance sooner
        "PYTHONPATH": str(ROOT),
    }
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("worker:"))
    url_arg = '"${REDIS_URL:-redis://127.0.0.1:6379/0}"'
    worker_argv = shlex.split(line.removeprefix("worker:").replace(url_arg, harness.REDIS_URL))
    worker_argv[0] = str(Path(sys.executable).parent / worker_argv[0])
    if worker_class:
        worker_argv[2:2] = ["--worker-class", worker_class]
    web = subprocess.Popen(
        procfile_web(port, 2, 4),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "web.log", "w"),  # noqa: SIM115
    )
    worker = subprocess.Popen(
        worker_argv,
        cwd=ROOT,
        env=env,
        stdout=open(tmp / "worker.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or web.poll() is not None:
                    raise SystemExit(f"gunicorn did not come up; see {tmp / 'web.log'}") from None
                time.sleep(0.2)
        yield url
    finally:
        for proc in (web, worker):
            proc.terminate()
        for proc in (web, worker):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def post_train(url: str, iid: str) -> tuple[float, str]:
    """POST one signed `/runctl train`; the time just before it, and the run id from the ack."""
    body = urlencode(
        {
            "team_id": "T0TEAM",
            "channel_id": "C0TRAIN",
            "user_id": "U0ALICE",
            "user_name": "alice",
            "command": "/runctl",
            "text": f"train {iid} {SCRIPT}",
            "api_app_id": "A0RUNCTL",
            "response_url": "https://hooks.slack.invalid/commands/1",
            "trigger_id": f"bench.{time.monotonic_ns()}",
        }
    )
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": str(SignatureVerifier(harness.SECRET).generate_signature(timestamp=ts, body=body)),
    }
    request = urllib.request.Request(url + "/slack/events", data=body.encode(), headers=headers, method="POST")
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = json.loads(resp.read().decode())["text"]
    found = re.search(r"Queued run `([^`]+)`", text)
    if not found:
        raise SystemExit(f"unexpected ack: {text}")
    return started, found.group(1)


def said(slack: FakeSlack, run_id: str, prefix: str) -> float | None:
    """When a parent-message call first said `prefix` about run_id (FakeSlack's monotonic time)."""
    for call in slack.calls:
        text = str(call.params.get("text", ""))
        if call.method in ("chat.postMessage", "chat.update") and text.startswith(prefix) and run_id in text:
            return call.at
    return None


ENDED = tuple(f"{state.value}:" for state in RunState if state.ended)


def ended(slack: FakeSlack, run_id: str) -> str | None:
    """The parent message's text once it says the run ended."""
    texts = (str(c.params.get("text", "")) for c in slack.calls)
    return next((text for text in texts if run_id in text and text.startswith(ENDED)), None)


def started_or_ended(slack: FakeSlack, run_id: str) -> tuple[float | None, str | None] | None:
    at, end = said(slack, run_id, "running:"), ended(slack, run_id)
    return (at, end) if at is not None or end is not None else None


def why_not(slack: FakeSlack, run_id: str, end: str | None) -> str:
    parents = [m for m in slack.messages("C0TRAIN") if m.thread_ts is None and run_id in m.text]
    replies = [m.text for p in parents for m in slack.thread("C0TRAIN", p.ts)]
    return f"run {run_id} never said running: {end}\n" + "\n".join(replies[-3:])


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "1 run")
    parser.add_argument("-n", type=int, default=20, help="runs")
    parser.add_argument("--worker-class", help="e.g. rq.worker.SimpleWorker (default: the Procfile's worker)")
    args = parser.parse_args(argv)
    n = 1 if args.smoke else args.n
    harness.bench_redis()
    seconds: list[float] = []
    with harness.sandbox() as box, harness.fake_slack() as slack, TemporaryDirectory() as tmp:
        names = ("gpu-box-1", "gpu-box-2", "cpu-box")
        instances = [seed(box.endpoint_url, box.region, harness.BUCKET).instances[name] for name in names]
        busy: dict[str, str] = {}
        with processes(box, slack, Path(tmp), args.worker_class) as url:
            for i in range(n):
                iid = instances[i % len(instances)]
                if iid in busy:
                    slack.wait_for(lambda iid=iid: ended(slack, busy[iid]), timeout=120)  # type: ignore[misc]
                started, run_id = post_train(url, iid)
                busy[iid] = run_id
                seen = slack.wait_for(lambda run_id=run_id: started_or_ended(slack, run_id), timeout=120)  # type: ignore[misc]
                at, end = seen or (None, None)
                if at is None:
                    raise SystemExit(why_not(slack, run_id, end))
                seconds.append(at - started)
        harness.bench_redis()  # flush what the processes left
    figures: dict[str, harness.Figure] = {
        "runs": n,
        "rq_worker": args.worker_class or "Procfile (forks a work horse per job)",
        "median_seconds": round(harness.percentile(seconds, 50), 3),
        "p95_seconds": round(harness.percentile(seconds, 95), 3),
        "max_seconds": round(max(seconds), 3),
    }
    harness.report("command_to_running", figures, {"median_seconds": "≤ 2", "p95_seconds": "≤ 2"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
