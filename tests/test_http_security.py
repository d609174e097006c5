"""Through the real web process (gunicorn): unsigned, forged and stale requests get
401 and queue nothing; a replayed request or click acts once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_mod
from rq import Queue

from workers import audit
from workers.queueing import QUEUE
from workers.sandbox.fake_slack import FakeSlack
from workers.slack.ids import ActionId, BlockId

from .conftest import REDIS_URL, TOKEN
from .slack import SECRET, action_body, click, command_body, sign

ROOT = Path(__file__).resolve().parents[1]
IID = "i-0123456789abcdef0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def web(slack: FakeSlack) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_API_URL": slack.base_url,
        "REDIS_URL": REDIS_URL,
        "RUNCTL_ADMINS": "U0ADMIN",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "bot.web:create()", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("gunicorn did not start:\n" + (proc.communicate()[1] or b"").decode()) from None
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def post(base: str, body: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"{base}/slack/events", data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def queued(redis: redis_mod.Redis, expect: int = 0) -> int:
    queue = Queue(QUEUE, connection=redis)
    deadline = time.monotonic() + 5
    while queue.count < expect and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # long enough for a wrongly accepted request to show up
    return int(queue.count)


FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda body: FORM, id="unsigned"),
        pytest.param(lambda body: sign(body, secret="not-the-secret"), id="forged"),
        pytest.param(lambda body: sign("text=something+else", secret=SECRET), id="tampered"),
        pytest.param(lambda body: sign(body, timestamp=int(time.time()) - 301), id="stale"),
        pytest.param(lambda body: sign(body, timestamp=int(time.time()) + 301), id="from-the-future"),
        pytest.param(lambda body: {**sign(body), "x-slack-signature": "v0=" + "0" * 64}, id="zero-signature"),
    ],
)
def test_bad_requests_get_401_and_queue_nothing(web: str, real_redis: redis_mod.Redis, headers: object) -> None:
    body = command_body(f"status {IID}")
    status, _ = post(web, body, headers(body))  # type: ignore[operator]
    assert status == 401
    assert queued(real_redis) == 0
    assert real_redis.xlen(audit.STREAM) == 0  # never reached the front door


def test_a_signed_request_is_queued_and_a_retry_is_not(web: str, real_redis: redis_mod.Redis) -> None:
    body = command_body(f"status {IID}", trigger_id="trig.http.once")
    status, text = post(web, body, sign(body))
    assert status == 200 and "queued" in text
    assert queued(real_redis, 1) == 1
    status, _ = post(web, body, {**sign(body), "x-slack-retry-num": "1", "x-slack-retry-reason": "http_timeout"})
    assert status == 200
    assert queued(real_redis, 2) == 1


def test_a_replayed_click_acts_once(web: str, real_redis: redis_mod.Redis) -> None:
    message = {
        "ts": "1700000000.000100",
        "text": "confirm",
        "blocks": [
            {
                "type": "actions",
                "block_id": BlockId.TERMINATE_ACTIONS,
                "elements": [
                    {"type": "button", "action_id": ActionId.TERMINATE_CANCEL, "value": "n",
                     "text": {"type": "plain_text", "text": "Cancel"}}
                ],
            }
        ],
    }
    body = action_body(click(message, ActionId.TERMINATE_CANCEL, user="U0ADMIN"))
    first, _ = post(web, body, sign(body))
    again, _ = post(web, body, sign(body))
    retry, _ = post(web, body, {**sign(body), "x-slack-retry-num": "2"})
    assert again == retry == 200 and first in (200, 404)  # 404 only while no handler is registered
    clicks = [r for r in audit.newest(real_redis, 10) if r.source == "click"]
    assert len(clicks) == 1 and clicks[0].text == "click terminate_cancel"
