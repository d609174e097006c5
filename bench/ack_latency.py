"""Benchmark 1: ack latency of the real `web` process over HTTP.

Starts gunicorn exactly as the Procfile does (against real Redis db 15 and a
fake Slack Web API for Bolt's start-up auth.test), then sends N signed
`/runctl train` and `/runctl status` requests from C concurrent closed-loop asyncio
clients, and times each request to its response. The requests are signed before the
clock starts and sent over keep-alive connections (`--new-connections`: one per
request), so the load generator stays cheap; it reports its own CPU beside the
server's (gunicorn master + workers) and Redis's.

    python bench/ack_latency.py [-n 2000] [-c 50] [--workers W] [--threads T] [--new-connections] [--bare] [--smoke]
    python bench/ack_latency.py --pair ROUNDS [-n 20000]     # both apps at once: the CPU ratio

`--bare` serves `bench/bare_app.py` instead (a bare Bolt app: signature check, ack, one
RQ enqueue) with the same gunicorn command: the floor our front door is compared with.
`--pair` serves both at once and alternates batches between them, which is how the ratio
in bench/README.md is measured.
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
from urllib.parse import urlencode

import redis as redis_mod
from slack_sdk.signature import SignatureVerifier

from bench import harness
from bench.bare_app import QUEUE as BARE_QUEUE
from runctl_sandbox.fake_slack import FakeSlack
from workers.queueing import QUEUES

SLACK_LIMIT_MS = 3000.0
INSTANCE = "i-0123456789abcdef0"
REPLY_TIMEOUT = 10.0  # seconds; a hung request fails the run instead of hanging it
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BARE_APP = "bench.bare_app:create()"


def procfile_web(port: int, workers: int | None, threads: int | None, bare: bool = False) -> list[str]:
    """The Procfile's web command, with the port and (for tuning) the pool sizes swapped in;
    `bare`: the same command serving the bare Bolt app."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    argv = shlex.split(line.removeprefix("web:").replace("${PORT:-3000}", str(port)))
    if bare:
        argv[argv.index("bot.web:create()")] = BARE_APP
    for flag, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        elif value is not None:
            argv += [flag, str(value)]
    if "--access-logfile" in argv:  # a log line per request is not what we measure
        del argv[argv.index("--access-logfile") : argv.index("--access-logfile") + 2]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


def procfile_pool(workers: int | None, threads: int | None) -> str:
    """How the measured gunicorn was configured, as the report shows it."""
    argv = procfile_web(0, workers, threads)

    def flag(name: str, default: str) -> str:
        return argv[argv.index(name) + 1] if name in argv else default

    threads_ = flag("--threads", "1")
    default_class = "gthread" if int(threads_) > 1 else "sync"  # gunicorn's own choice
    return f"{flag('--workers', '1')} workers x {threads_} threads, {flag('--worker-class', default_class)}"


@contextmanager
def web_process(
    slack: FakeSlack, workers: int | None, threads: int | None, bare: bool = False
) -> Iterator[tuple[int, int]]:
    """gunicorn from the Procfile; (port, pid of its master)."""
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
            procfile_web(port, workers, threads, bare), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
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
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def requests(n: int, tag: str, keep_alive: bool, response_url: str) -> list[bytes]:
    """n signed HTTP requests, alternating train and status, each with its own trigger id
    (a repeated one would be dropped as a replay). Built before the clock starts: signing
    is the load generator's work, not the server's. `response_url` is one the web process
    trusts (the fake Slack's, as Slack's own would be): a foreign one is logged and dropped
    on every request, which is not what Slack sends."""
    verifier = SignatureVerifier(harness.SECRET)
    connection = "keep-alive" if keep_alive else "close"
    out = []
    for i in range(n):
        text = f"status {INSTANCE}" if i % 2 else f"train {INSTANCE} train.py -- --epochs {i}"
        body = urlencode(
            {
                "team_id": "T0TEAM",
                "channel_id": "C0TRAIN",
                "user_id": "U0ALICE",
                "user_name": "alice",
                "command": "/runctl",
                "text": text,
                "api_app_id": "A0RUNCTL",
                "response_url": response_url,
                "trigger_id": f"bench.{tag}.{i}",
            }
        )
        ts = str(int(time.time()))
        sig = verifier.generate_signature(timestamp=ts, body=body)
        head = (
            "POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nConnection: {connection}\r\n"
            f"X-Slack-Request-Timestamp: {ts}\r\nX-Slack-Signature: {sig}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body.encode())
    return out


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> tuple[int, bool]:
    """Send one request and read its response; (HTTP status, whether the server keeps the connection)."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, keep = 0, True
    for line in head.lower().split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line[15:])
        elif line.startswith(b"connection:"):
            keep = b"close" not in line
    await reader.readexactly(length)
    return status, keep


async def client(
    port: int, payloads: Iterator[bytes], keep_alive: bool, latencies: list[float], statuses: list[int]
) -> None:
    """One closed-loop client: the next request goes when the last one's response is in."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    for payload in payloads:
        started = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            status, keep = await asyncio.wait_for(exchange(*conn, payload), REPLY_TIMEOUT)
        except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status, keep = 0, False  # counted as not acked
        latencies.append((time.perf_counter() - started) * 1000)
        statuses.append(status)
        if conn is not None and not (keep and keep_alive):
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def load(
    port: int, payloads: list[bytes], concurrency: int, keep_alive: bool
) -> tuple[list[float], list[int], float, float]:
    """Latencies (ms), statuses, wall time (s) and this process's CPU time (s) for the run."""
    shared = iter(payloads)  # every client takes the next request from one iterator
    latencies: list[float] = []
    statuses: list[int] = []
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(port, shared, keep_alive, latencies, statuses) for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started, time.process_time() - cpu


def queued_jobs(redis: redis_mod.Redis) -> int:
    """Jobs waiting on every runctl queue (trains go to the long one), and the bare app's."""
    return sum(int(redis.llen(f"rq:queue:{name}")) for name in (*QUEUES, BARE_QUEUE))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (gunicorn's master and workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pids.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue  # gone, or /proc is not Linux's: the figure is then a lower bound
    return total


def redis_cpu_seconds(redis: redis_mod.Redis) -> float:
    info = redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__ or "", "100 requests from 10 clients")
    parser.add_argument("-n", type=int, default=2000, help="requests")
    parser.add_argument("-c", type=int, default=50, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the Procfile's)")
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads (default: the Procfile's)")
    parser.add_argument(
        "--new-connections", action="store_true", help="one TCP connection per request instead of keep-alive"
    )
    parser.add_argument("--bare", action="store_true", help="serve the bare Bolt app (bench/bare_app.py)")
    parser.add_argument(
        "--pair",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="serve both apps at once and send them the requests in ROUNDS alternating batches: the CPU ratio",
    )
    args = parser.parse_args(argv)
    n, c = (100, 10) if args.smoke else (args.n, args.c)
    keep_alive = not args.new_connections
    redis = harness.bench_redis()
    if args.pair:
        return pair(redis, n, c, keep_alive, args.pair, args.workers, args.threads)
    with harness.fake_slack() as slack, web_process(slack, args.workers, args.threads, args.bare) as (port, pid):
        hook = slack.response_url("bench")
        warm, payloads = requests(min(200, n), "warm", keep_alive, hook), requests(n, "run", keep_alive, hook)
        asyncio.run(load(port, warm, c, keep_alive))  # every worker and connection warmed up
        before = queued_jobs(redis)
        server_cpu, redis_cpu = tree_cpu_seconds(pid), redis_cpu_seconds(redis)
        latencies, statuses, wall, client_cpu = asyncio.run(load(port, payloads, c, keep_alive))
        server_cpu, redis_cpu = tree_cpu_seconds(pid) - server_cpu, redis_cpu_seconds(redis) - redis_cpu
        queued = queued_jobs(redis) - before
        pool = procfile_pool(args.workers, args.threads)
    redis.flushdb()
    p99 = harness.percentile(latencies, 99)
    figures: dict[str, harness.Figure] = {
        "app": "bare Bolt app" if args.bare else "runctl web",
        "requests": n,
        "concurrency": c,
        "connections": "keep-alive" if keep_alive else "one per request",
        "gunicorn": pool,
        "p50_ms": round(harness.percentile(latencies, 50), 1),
        "p95_ms": round(harness.percentile(latencies, 95), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(max(latencies), 1),
        "p99_of_slack_limit": round(p99 / SLACK_LIMIT_MS, 4),
        "over_3000_ms": sum(1 for x in latencies if x > SLACK_LIMIT_MS),
        "requests_per_s": round(len(latencies) / wall, 1),
        "non_200": sum(1 for s in statuses if s != 200),
        "jobs_queued": queued,
        "server_cpu_ms_per_request": round(server_cpu * 1000 / n, 2),
        "redis_cpu_ms_per_request": round(redis_cpu * 1000 / n, 2),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / n, 2),
        "client_cpu_cores": round(client_cpu / wall, 2),
    }
    harness.report("ack_latency", figures, {"p99_ms": "≤ 50 at C=50", "over_3000_ms": "= 0", "non_200": "= 0"})
    return 0


def pair(
    redis: redis_mod.Redis, n: int, c: int, keep_alive: bool, rounds: int, workers: int | None, threads: int | None
) -> int:
    """Both apps served at once, each sent n requests in `rounds` batches, web then bare in
    turn: a load that comes and goes meets both alike, so the ratio of their CPU per ack
    holds where two runs a minute apart differ by ±20 %."""
    batch = max(1, n // rounds)
    cpu = {"web": 0.0, "bare": 0.0}
    ratios: list[float] = []
    with (
        harness.fake_slack() as slack,
        web_process(slack, workers, threads) as web,
        web_process(slack, workers, threads, bare=True) as bare,
    ):
        hook = slack.response_url("bench")
        for name, (port, _pid) in (("web", web), ("bare", bare)):
            asyncio.run(load(port, requests(min(200, n), f"warm-{name}", keep_alive, hook), c, keep_alive))
        for r in range(rounds):
            spent = {}
            for name, (port, pid) in (("web", web), ("bare", bare)):
                payloads = requests(batch, f"{name}-{r}", keep_alive, hook)
                before = tree_cpu_seconds(pid)
                _, statuses, _, _ = asyncio.run(load(port, payloads, c, keep_alive))
                spent[name] = tree_cpu_seconds(pid) - before
                cpu[name] += spent[name]
                if any(s != 200 for s in statuses):
                    raise SystemExit(f"{name}: {sum(s != 200 for s in statuses)} requests not acked")
            ratios.append(spent["web"] / spent["bare"])
    redis.flushdb()
    ratios.sort()
    figures: dict[str, harness.Figure] = {
        "requests_each": batch * rounds,
        "rounds": rounds,
        "concurrency": c,
        "gunicorn": procfile_pool(workers, threads),
        "web_cpu_ms_per_ack": round(cpu["web"] * 1000 / (batch * rounds), 3),
        "bare_cpu_ms_per_ack": round(cpu["bare"] * 1000 / (batch * rounds), 3),
        "cpu_ratio": round(cpu["web"] / cpu["bare"], 3),
        "round_ratio_median": round(ratios[len(ratios) // 2], 3),
        "round_ratio_min_max": f"{ratios[0]:.2f}–{ratios[-1]:.2f}",
        "load_avg_1min": os.getloadavg()[0],
    }
    harness.report("ack_latency_pair", figures, {"cpu_ratio": "≤ 1.2"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
