"""Benchmark 1: ack latency of the real `web` process over HTTP.

Starts gunicorn exactly as the Procfile does (against real Redis db 15 and a
fake Slack Web API for Bolt's start-up auth.test), then sends N signed
`/runctl train` and `/runctl status` requests from C concurrent asyncio clients,
a new connection per request as Slack does, and times each request to its response.

    python bench/ack_latency.py [-n 2000] [-c 50] [--workers 2] [--threads 4] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/ack_latency.py`

import asyncio
import os
import shlex
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from slack_sdk.signature import SignatureVerifier

from bench import harness
from workers.sandbox.fake_slack import FakeSlack

SLACK_LIMIT_MS = 3000.0
REPLY_TIMEOUT = 10.0  # seconds; a hung request fails the run instead of hanging it
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_web(port: int, workers: int, threads: int) -> list[str]:
    """The Procfile's web command, with the port and (for tuning) the pool sizes swapped in."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    argv = shlex.split(line.removeprefix("web:").replace("${PORT:-3000}", str(port)))
    for flag, value in (("--workers", workers), ("--threads", threads)):
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
    if "--access-logfile" in argv:  # a log line per request is not what we measure
        del argv[argv.index("--access-logfile") : argv.index("--access-logfile") + 2]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


@contextmanager
def web_process(slack: FakeSlack, workers: int, threads: int) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "SLACK_BOT_TOKEN": harness.TOKEN,
        "SLACK_SIGNING_SECRET": harness.SECRET,
        "SLACK_API_URL": slack.base_url,
        "REDIS_URL": harness.REDIS_URL,
        "RUNCTL_CHANNEL": "C0TRAIN",
        "RUNCTL_RATE_PER_MINUTE": "1000000",  # one user sends them all; the limiter is not under test
        "PYTHONPATH": str(ROOT),
    }
    # A file, not a pipe: nobody drains it, and a full pipe blocks gunicorn mid-request.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            procfile_web(port, workers, threads), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise SystemExit(f"gunicorn did not come up:\n{log.read().decode()[-3000:]}") from None
                    time.sleep(0.2)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def requests(n: int, tag: str) -> list[bytes]:
    """n signed HTTP requests, alternating train and status, each with its own trigger id
    (a repeated one would be dropped as a replay)."""
    from urllib.parse import urlencode

    verifier = SignatureVerifier(harness.SECRET)
    out = []
    for i in range(n):
        text = "status" if i % 2 else f"train i-0123456789abcdef0 train.py -- --epochs {i}"
        body = urlencode(
            {
                "team_id": "T0TEAM", "channel_id": "C0TRAIN", "user_id": "U0ALICE", "user_name": "alice",
                "command": "/runctl", "text": text, "api_app_id": "A0RUNCTL",
                "response_url": "https://hooks.slack.invalid/commands/1", "trigger_id": f"bench.{tag}.{i}",
            }
        )
        ts = str(int(time.time()))
        sig = verifier.generate_signature(timestamp=ts, body=body)
        head = (
            "POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
            f"X-Slack-Request-Timestamp: {ts}\r\nX-Slack-Signature: {sig}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body.encode())
    return out


async def one(port: int, payload: bytes) -> int:
    """Send one request on its own connection, as Slack does; its HTTP status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        reply = await reader.read()  # the server closes: "Connection: close"
    finally:
        writer.close()
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


async def client(port: int, queue: asyncio.Queue[bytes], latencies: list[float], statuses: list[int]) -> None:
    while not queue.empty():
        payload = queue.get_nowait()
        started = time.perf_counter()
        try:
            status = await asyncio.wait_for(one(port, payload), REPLY_TIMEOUT)
        except (TimeoutError, OSError):
            status = 0  # counted as not acked
        latencies.append((time.perf_counter() - started) * 1000)
        statuses.append(status)


async def load(port: int, payloads: list[bytes], concurrency: int) -> tuple[list[float], list[int], float]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    latencies: list[float] = []
    statuses: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*(client(port, queue, latencies, statuses) for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "100 requests from 10 clients")
    parser.add_argument("-n", type=int, default=2000, help="requests")
    parser.add_argument("-c", type=int, default=50, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    n, c = (100, 10) if args.smoke else (args.n, args.c)
    redis = harness.bench_redis()
    with harness.fake_slack() as slack, web_process(slack, args.workers, args.threads) as port:
        asyncio.run(load(port, requests(min(50, n), "warm"), min(c, 10)))  # warm every worker up
        before = int(redis.llen("rq:queue:runctl"))
        latencies, statuses, wall = asyncio.run(load(port, requests(n, "run"), c))
        queued = int(redis.llen("rq:queue:runctl")) - before
    redis.flushdb()
    p99 = harness.percentile(latencies, 99)
    figures: dict[str, harness.Figure] = {
        "requests": n,
        "concurrency": c,
        "gunicorn": f"{args.workers} workers x {args.threads} threads",
        "p50_ms": round(harness.percentile(latencies, 50), 1),
        "p95_ms": round(harness.percentile(latencies, 95), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(max(latencies), 1),
        "p99_of_slack_limit": round(p99 / SLACK_LIMIT_MS, 4),
        "over_3000_ms": sum(1 for x in latencies if x > SLACK_LIMIT_MS),
        "requests_per_s": round(len(latencies) / wall, 1),
        "non_200": sum(1 for s in statuses if s != 200),
        "jobs_queued": queued,
    }
    harness.report("ack_latency", figures, {"p99_ms": "≤ 50 at C=50", "over_3000_ms": "= 0", "non_200": "= 0"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
