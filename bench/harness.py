"""What every benchmark shares: arguments, percentiles, the report format, and
the real Redis db they own (db 15: tests use 1-14 by pid; only it is flushed)."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import redis as redis_mod

from runctl_sandbox.aws import Sandbox
from runctl_sandbox.fake_slack import FakeSlack
from workers.services import Services
from workers.settings import Settings
from workers.slack.client import Notifier, make_client

REDIS_URL = os.environ.get("RUNCTL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
TOKEN = "xoxb-bench-token"
SECRET = "bench-signing-secret"
BUCKET = "runctl-bench-bundles"
JSON_MARK = "BENCH-JSON "  # the machine-readable line the smoke test reads

Figure = int | float | str | bool


def arguments(description: str, smoke_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report(name: str, figures: dict[str, Figure], targets: dict[str, str] | None = None) -> None:
    """Print the figures one per line (with the target beside it), then one JSON line."""
    targets = targets or {}
    width = max(len(k) for k in figures)
    print(f"== {name}")
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        target = f"   (target {targets[key]})" if key in targets else ""
        print(f"  {key.ljust(width)}  {shown}{target}")
    print(JSON_MARK + json.dumps({"benchmark": name, **figures}))
    sys.stdout.flush()


def bench_redis() -> redis_mod.Redis:
    client = redis_mod.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis_mod.ConnectionError:
        raise SystemExit(f"Redis is not running at {REDIS_URL}; start it with `redis-server --daemonize yes`") from None
    client.flushdb()
    return client


def settings(slack: FakeSlack, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_API_URL": slack.base_url,
        "REDIS_URL": REDIS_URL,
        "RUNCTL_S3_BUCKET": BUCKET,
        "RUNCTL_CHANNEL": "C0OPS",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def services(config: Settings, redis: redis_mod.Redis, slack: FakeSlack) -> Services:
    return Services(settings=config, redis=redis, notifier=Notifier(make_client(config)))


@contextmanager
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack(member_of=("C0TRAIN", "C0OPS"))  # the channels the bot was invited to
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    """moto + the executing-SSM shim, with this process's AWS environment pointed at it."""
    with TemporaryDirectory(prefix="runctl-bench-") as tmp:
        box = Sandbox(Path(tmp) / "sandbox")
        box.start()
        old = {k: os.environ.get(k) for k in box.env()}
        os.environ.update(box.env())
        try:
            yield box
        finally:
            box.stop()
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
