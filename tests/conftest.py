"""Shared fixtures: real Redis, the moto sandbox with the executing-SSM shim,
the fake Slack Web API, and Services wired to all three."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.loaders
import botocore.session
import fakeredis
import pytest
import redis as redis_mod

from runctl_sandbox.aws import SEED_INSTANCES, Sandbox, SeedInfo, seed
from runctl_sandbox.example_repo import make_example_repo
from runctl_sandbox.fake_slack import DEFAULT_BUDGETS, FakeSlack
from runctl_sandbox.inline import InlineWorker
from runctl_sandbox.ssm_agent import AGENT_PATH
from workers import services
from workers.services import Services
from workers.settings import Settings
from workers.slack.client import Notifier, make_client

# One db per test process, so parallel runs on one machine never flush each other: pytest-xdist's
# workers (gw0, gw1, ...) take dbs 1, 2, ...; a run without xdist takes one by its pid.
_XDIST = os.environ.get("PYTEST_XDIST_WORKER", "")
_DB = 1 + int(_XDIST[2:]) if _XDIST.startswith("gw") else 1 + os.getpid() % 14
REDIS_URL = os.environ.get("RUNCTL_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_DB}")
BUCKET = "runctl-test-bundles"
# Sandbox instances run scripts with the SSM agent's PATH, as real ones do. A machine whose
# only Python is elsewhere (pyenv, say) names it, as RUNCTL_PYTHON or a runctl:python tag would.
INSTANCE_PYTHON = "python3" if shutil.which("python3", path=AGENT_PATH) else sys.executable
TOKEN = "xoxb-test-token"
# The channels the test workspace invited the bot to; any other C… id is a public
# channel it is not in (posts work through chat:write.public, files and ephemerals do not).
MEMBER_OF = ("C0TRAIN", "C0OPS", "C0ENV", "C0RANDOM")

# Each test's Services makes a boto3 Session, whose clients parse botocore's service models
# afresh (~0.15 s a client, most of a short test): one loader for the process caches them.
_LOADER = botocore.loaders.create_loader()
botocore.session.create_loader = lambda search_path_string=None: _LOADER
# EC2 forgets a terminated instance after about an hour (Ec2.terminated_visible_seconds); a
# session's thousands of test instances would otherwise slow every Describe and SSM call.
TERMINATED_VISIBLE_SECONDS = 120.0


@pytest.fixture
def real_redis() -> Iterator[redis_mod.Redis]:
    client = redis_mod.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis_mod.ConnectionError:
        pytest.fail(f"Redis is not running at {REDIS_URL}; start it with `redis-server --daemonize yes`")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> redis_mod.Redis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("sandbox"))
    box.agent_online_after = 0  # agents register at once; a test that needs the wait sets it
    box.ec2.terminated_visible_seconds = TERMINATED_VISIBLE_SECONDS
    box.start()
    old = {k: os.environ.get(k) for k in box.env()}
    os.environ.update(box.env())
    yield box
    box.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def fleet_seed(sandbox: Sandbox) -> Iterator[SeedInfo]:
    """Fresh instances per test, terminated after it, so state never leaks between tests
    (the sandbox lives for the session: running leftovers would swell every later sweep)."""
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    # Commands take Name tags, so a name must be unique: another module's leftover seed goes first.
    leftovers = [
        i["InstanceId"]
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": "tag:Name", "Values": [name for name, *_ in SEED_INSTANCES]},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
            ]
        )
        for r in page["Reservations"]
        for i in r["Instances"]
    ]
    if leftovers:
        ec2.terminate_instances(InstanceIds=leftovers)
    info = seed(sandbox.endpoint_url, "us-east-1", BUCKET)
    yield info
    ec2.terminate_instances(InstanceIds=list(info.instances.values()))


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_example_repo(tmp_path_factory.mktemp("repo") / "training-code")


@pytest.fixture(scope="session")
def slack() -> Iterator[FakeSlack]:
    # Slack's documented rates (DEFAULT_BUDGETS), as every test meets them: a product that
    # posts or updates faster than Slack allows fails here, as it would on a real workspace.
    fake = FakeSlack(member_of=MEMBER_OF, budgets=DEFAULT_BUDGETS)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def settings(slack: FakeSlack, example_repo: Path, tmp_path: Path) -> Settings:
    return Settings(
        SLACK_BOT_TOKEN=TOKEN,
        SLACK_SIGNING_SECRET="test-signing-secret",
        SLACK_API_URL=slack.base_url,
        REDIS_URL=REDIS_URL,
        RUNCTL_REPO=str(example_repo),
        RUNCTL_S3_BUCKET=BUCKET,
        RUNCTL_MIRROR_DIR=tmp_path / "mirror",
        RUNCTL_CHANNEL="C0OPS",
        RUNCTL_ADMINS=["U0ADMIN"],
        RUNCTL_POLL_MIN_SECONDS=0.2,
        RUNCTL_POLL_MAX_SECONDS=0.5,
        RUNCTL_LAUNCH_CHECK_SECONDS=0.5,
        RUNCTL_STOP_GRACE_SECONDS=20,
        RUNCTL_PYTHON=INSTANCE_PYTHON,
        # Flows assert on a message right after they return: no coalescing unless a test asks.
        RUNCTL_SLACK_UPDATE_SECONDS=0,
        RUNCTL_SLACK_UPDATES_PER_MINUTE=6000,
    )


@pytest.fixture
def svc(settings: Settings, real_redis: redis_mod.Redis, slack: FakeSlack, sandbox: Sandbox) -> Iterator[Services]:
    slack.reset()
    current = Services(
        settings=settings,
        redis=real_redis,
        notifier=Notifier(make_client(settings)),  # the retry handlers the workers use
    )
    services.install(current)
    yield current
    services.install(None)


@pytest.fixture
def worker(svc: Services) -> InlineWorker:
    return InlineWorker(svc.redis)


def sent_commands(svc: Services, instance_id: str) -> list[dict[str, Any]]:
    """moto's own list of SSM commands sent to an instance."""
    return list(svc.fleet.ssm.list_commands(InstanceId=instance_id)["Commands"])


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the real Redis server (`real_redis`, so `svc`, `worker`) is marked
    `redis`, so `-m "not redis and not slow"` runs without one. `torch` tests (slow:
    PyTorch loads for seconds per process) run only when selected, `-m torch`."""
    for item in items:
        if "real_redis" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)
    if "torch" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="PyTorch example: `pip install torch==2.13.0`, then `python3 -m pytest -m torch`")
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(skip)
