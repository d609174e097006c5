"""Through the real web process (gunicorn): unsigned, forged and stale requests get
401 and queue nothing; a replayed request or click acts once."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_mod
from pydantic import SecretStr
from rq import Queue
from slack_sdk import WebClient

from bot.app import build_app
from runctl_sandbox.fake_slack import FakeSlack
from workers import audit
from workers.queueing import QUEUE
from workers.settings import Settings
from workers.slack import hooks
from workers.slack.ids import ActionId, BlockId

from .conftest import REDIS_URL, TOKEN
from .queues import queued as waiting
from .slack import SECRET, action, action_body, click, command, command_body, request, sign, signature

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
    MASTER[base] = proc.pid
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
    """Jobs on every queue, once `expect` are there or 5 s passed."""
    deadline = time.monotonic() + 5
    while len(waiting(redis)) < expect and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # long enough for a wrongly accepted request to show up
    return len(waiting(redis))


FORM = {"content-type": "application/x-www-form-urlencoded"}
MASTER: dict[str, int] = {}  # base URL -> gunicorn master pid


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
    assert status == 200 and text == ""  # accepted: status answers in one message, later
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
                    {
                        "type": "button",
                        "action_id": ActionId.TERMINATE_CANCEL,
                        "value": "n",
                        "text": {"type": "plain_text", "text": "Cancel"},
                    }
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


# --- issue 11 #2: a request that fails verification for any reason gets 401 and nothing else


class Listener:
    """A local HTTP server that records every request: the target of a forged response_url."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Record(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    target = Listener()
    yield target
    target.close()


def raw_request(base: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[int, str]:
    """POST with headers exactly as given (repeats kept, as a client may send them)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        conn.putrequest("POST", "/slack/events")
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


MALFORMED = [
    pytest.param([("X-Slack-Request-Timestamp", "abc")], id="abc"),
    pytest.param([("X-Slack-Request-Timestamp", "ts, 1")], id="joined"),
    pytest.param([("X-Slack-Request-Timestamp", "ts"), ("X-Slack-Request-Timestamp", "1")], id="two-headers"),
]


@pytest.mark.parametrize("stamp", MALFORMED)
def test_a_malformed_timestamp_gets_401_and_no_audit_no_respond(
    web: str, real_redis: redis_mod.Redis, listener: Listener, stamp: list[tuple[str, str]]
) -> None:
    body = command_body(f"terminate {IID}", user="U0ADMIN", response_url=listener.url)
    forged = signature(body, stamp[0][1])
    headers = [("Content-Type", "application/x-www-form-urlencoded"), *stamp, ("X-Slack-Signature", forged)]
    status, _ = raw_request(web, headers, body.encode())
    assert status == 401
    assert queued(real_redis) == 0  # also long enough for a wrongly made POST to arrive
    assert listener.hits == []
    assert real_redis.xlen(audit.STREAM) == 0


@pytest.mark.parametrize("stamp", ["abc", "ts, 1"])
def test_a_malformed_timestamp_through_dispatch_is_refused_by_the_error_funnel(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack, listener: Listener, stamp: str
) -> None:
    """The same attack past the WSGI front door (Bolt's verifier raises; the funnel must not act)."""
    settings.SLACK_SIGNING_SECRET = SecretStr(SECRET)
    app = build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    body = command_body(f"status {IID}", response_url=listener.url)
    headers = {**sign(body), "x-slack-request-timestamp": stamp}
    slack.reset()
    assert app.dispatch(request(body, headers)).status == 401
    time.sleep(0.2)
    assert listener.hits == [] and slack.calls == []
    assert real_redis.xlen(audit.STREAM) == 0 and waiting(real_redis) == []


def test_respond_goes_only_to_slack_response_urls(
    settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack, listener: Listener
) -> None:
    """A signed request that fails in a handler is answered at its response_url only when
    that is Slack's (here the fake Slack's host, as SLACK_API_URL configures it)."""
    settings.SLACK_SIGNING_SECRET = SecretStr(SECRET)
    app = build_app(settings, real_redis, WebClient(token=TOKEN, base_url=slack.base_url), token_verification=False)
    slack.reset()
    for url in (listener.url, "https://hooks.slack.com.evil.example/x", slack.response_url("ok")):
        payload = {  # a username of the wrong type: the handler raises, the gate (which ignores it) does not;
            # [Cancel] on a launch: a button everyone may click, so the gate lets it through
            "type": "block_actions",
            "user": {"id": "U0ALICE", "username": 5},
            "channel": {"id": "C0TRAIN"},
            "trigger_id": f"t.{time.monotonic_ns()}",
            "response_url": url,
            "actions": [{"action_id": ActionId.LAUNCH_CANCEL, "value": "n", "action_ts": f"{time.time():.6f}"}],
        }
        app.dispatch(action(payload))
    time.sleep(0.2)
    assert listener.hits == []
    assert [c.response_url for c in slack.calls_to("response_url")] == ["ok"]  # the internal-error note
    # ...and a command's job never carries a foreign response_url to the worker.
    app.dispatch(command(f"status {IID}", response_url=listener.url))
    (job,) = Queue(QUEUE, connection=real_redis).jobs
    assert job.args[1]["response_url"] is None


# --- issue 11 #9: bodies over the limit are refused before they are read; nothing is parsed unsigned

MB = 1024 * 1024


def worker_peak_rss_mb(base: str) -> float:
    """Peak resident memory (VmHWM) of the (single) gunicorn worker."""
    master = MASTER[base]
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    (worker,) = children
    status = Path(f"/proc/{worker}/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kb) / 1024


def send_streaming(base: str, head: list[tuple[str, str]], chunks: Iterator[bytes], chunked: bool = False) -> int:
    """Send the headers, then stream the body from another thread while this one waits for
    the answer (a front door that answers early is seen before the body is through)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    lines = ["POST /slack/events HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in head)]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def pump() -> None:
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what a front door may do

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        status_line = sock.makefile("rb").readline()
    finally:
        sender.join(timeout=30)
        sock.close()
    return int(status_line.split()[1])


def hundred_mb() -> Iterator[bytes]:
    block = b"a" * MB
    for _ in range(100):
        yield block


def plausible_headers() -> list[tuple[str, str]]:
    """Headers shaped like a fresh signature (the HMAC is wrong, which needs the body to tell)."""
    return [("X-Slack-Request-Timestamp", str(int(time.time()))), ("X-Slack-Signature", "v0=" + "ab" * 32)]


def test_a_100_mb_body_is_refused_without_the_worker_growing(web: str, real_redis: redis_mod.Redis) -> None:
    before = worker_peak_rss_mb(web)
    form = ("Content-Type", "application/x-www-form-urlencoded")
    size = ("Content-Length", str(100 * MB))
    assert send_streaming(web, [form, size], hundred_mb()) == 401  # unsigned
    assert send_streaming(web, [form, size, *plausible_headers()], hundred_mb()) == 413  # declared too large
    assert send_streaming(web, [form, *plausible_headers()], hundred_mb(), chunked=True) == 413  # capped read
    after = worker_peak_rss_mb(web)
    print(f"worker peak RSS {before:.0f} MB -> {after:.0f} MB after three 100 MB bodies")
    assert after - before < 20
    assert real_redis.xlen(audit.STREAM) == 0


def test_three_million_form_fields_are_answered_before_the_body_is_sent(web: str) -> None:
    """Nothing is read or parsed before the headers could be a signature: the 401 comes
    while the client has not sent a byte of its 12 MB body. A body signed with the real
    secret is still refused by its declared size, unread."""
    body = b"a=1&" * 3_000_000
    form = ("Content-Type", "application/x-www-form-urlencoded")
    size = ("Content-Length", str(len(body)))
    assert send_streaming(web, [form, size], iter(())) == 401
    signed = [(k, v) for k, v in sign(body.decode()).items() if k.startswith("x-slack")]
    assert send_streaming(web, [form, size, *signed], iter(())) == 413


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.slack.com/commands/T0TEAM/1/abc", True),
        ("https://hooks.slack.com/actions/T0TEAM/1/abc", True),
        ("http://hooks.slack.com/commands/T0TEAM/1/abc", False),  # not https
        ("https://hooks.slack.com:8443/commands/x", False),
        ("https://hooks.slack.com@evil.example/commands/x", False),  # user info: the host is evil.example
        ("https://evil.example/?u=https://hooks.slack.com/", False),
        ("https://hooks.slack.com.evil.example/x", False),
        ("http://169.254.169.254/latest/meta-data/", False),
        ("", False),
    ],
)
def test_only_slacks_response_urls_are_trusted(settings: Settings, url: str, ok: bool) -> None:
    assert (hooks.trusted(settings, url) == url) is ok
