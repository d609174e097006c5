"""End to end: the real `web` process (gunicorn) and a real `worker` process (rq),
signed HTTP requests, a fake Slack Web API, moto + the executing-SSM shim."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers.queueing import EVENTS_QUEUE, JobPath

from . import slack as s
from .conftest import BUCKET, REDIS_URL, TOKEN

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def processes(
    real_redis: object, sandbox: Sandbox, slack: FakeSlack, example_repo: Path, tmp_path: Path
) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **sandbox.env(),
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": s.SECRET,
        "SLACK_API_URL": slack.base_url,
        "REDIS_URL": REDIS_URL,
        "RUNCTL_REPO": str(example_repo),
        "RUNCTL_S3_BUCKET": BUCKET,
        "RUNCTL_MIRROR_DIR": str(tmp_path / "mirror"),
        "RUNCTL_POLL_MIN_SECONDS": "0.5",
        "RUNCTL_POLL_MAX_SECONDS": "1",
        "RUNCTL_LAUNCH_CHECK_SECONDS": "0.5",
        "RUNCTL_EVENTS_URL": f"http://127.0.0.1:{port}/runctl/events",  # the instance reaches gunicorn
    }
    bindir = Path(sys.executable).parent
    web_log = open(tmp_path / "web.log", "w")  # noqa: SIM115 (lives as long as the process)
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    web = subprocess.Popen(
        [
            str(bindir / "gunicorn"),
            "bot.web:create()",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "4",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=web_log,
    )
    worker = subprocess.Popen(
        [
            str(bindir / "rq"),
            "worker",
            "--worker-class",
            "workers.worker.RunctlWorker",
            "--with-scheduler",
            "--url",
            REDIS_URL,
            "runctl-long",
            "runctl",
            "runctl-events",
        ],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    for proc in (web, worker):
        proc.send_signal(signal.SIGTERM)
    for proc in (web, worker):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    web_log.close()
    worker_log.close()


def ran_events() -> list[str]:
    """The kinds of the run events whose jobs the worker finished."""
    redis = Redis.from_url(REDIS_URL)
    registry = FinishedJobRegistry(queue=Queue(EVENTS_QUEUE, connection=redis))
    jobs = (Job.fetch(i, connection=redis) for i in registry.get_job_ids())
    return [str(j.return_value()).split(":")[0] for j in jobs if j.func_name == JobPath.RUN_EVENT.value]


def post(url: str, body: str, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url + "/slack/events", data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_train_over_http_runs_to_the_end(processes: str, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    slack.reset()
    iid = fleet_seed.instances["gpu-box-1"]
    body = s.command_body(
        f"train {iid} train_with_checkpoints.py -- --epochs 2 --steps-per-epoch 2 --step-seconds 0.05"
    )
    status, text = post(processes, body, s.sign(body))
    assert status == 200
    assert "Queued run" in json.loads(text)["text"]

    def finished() -> bool:
        return any("finished (exit 0)" in m.text and "<@U0ALICE>" in m.text for m in slack.messages("C0TRAIN"))

    slack.wait_for(finished, timeout=120)

    def parent_finished() -> bool:  # the parent's last update may wait out its coalescing interval
        parents = [m for m in slack.messages("C0TRAIN") if m.thread_ts is None]
        return len(parents) == 1 and "Finished" in json.dumps(parents[0].blocks)

    slack.wait_for(parent_finished, timeout=30)
    slack.wait_for(lambda: "exit" in ran_events(), timeout=20)  # the wrapper's exit event got through gunicorn
    assert len([m for m in slack.messages("C0TRAIN") if m.thread_ts is None]) == 1

    forged = s.command_body(f"status {iid}")
    assert post(processes, forged, s.sign(forged, secret="wrong"))[0] == 401
