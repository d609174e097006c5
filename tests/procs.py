"""The Procfile's `worker` and `clock` as real processes, against the test Redis, the
session's sandbox and fake Slack."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runctl_sandbox.aws import Sandbox
from runctl_sandbox.fake_slack import FakeSlack

from .conftest import BUCKET, INSTANCE_PYTHON, REDIS_URL, TOKEN

ROOT = Path(__file__).resolve().parent.parent
RQ = [sys.executable, "-c", "from rq.cli import main; main()"]


def procfile(name: str) -> list[str]:
    """The Procfile's command for `name`, split as sh would (only $VAR defaults in it)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].split()
    raise KeyError(name)


class Procs:
    """Started processes, each in its own process group (as a supervisor runs them)."""

    def __init__(self, sandbox: Sandbox, slack: FakeSlack, repo: Path, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")},
            **sandbox.env(),
            "PYTHONPATH": str(ROOT),
            "SLACK_BOT_TOKEN": TOKEN,
            "SLACK_API_URL": slack.base_url,
            "REDIS_URL": REDIS_URL,
            "RUNCTL_REPO": str(repo),
            "RUNCTL_S3_BUCKET": BUCKET,
            "RUNCTL_MIRROR_DIR": str(tmp / "mirror"),
            "RUNCTL_PYTHON": INSTANCE_PYTHON,
            "RUNCTL_CHANNEL": "C0OPS",
            "RUNCTL_POLL_MIN_SECONDS": "0.5",
            "RUNCTL_POLL_MAX_SECONDS": "1",
            "RUNCTL_LAUNCH_CHECK_SECONDS": "0.5",
            "RUNCTL_SLACK_UPDATE_SECONDS": "0",
            "RUNCTL_SLACK_UPDATES_PER_MINUTE": "6000",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """`worker` or `clock`, as the Procfile says, with ``rq`` and ``python3`` this interpreter's."""
        argv = procfile(name)
        head = {"rq": RQ, "python3": [sys.executable]}[argv[0]]
        argv = [*head, *(REDIS_URL if a.startswith('"${REDIS_URL') else a for a in argv[1:])]
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and everything under it, no cleanup: its workers and their work
        horses, which rq forks into groups of their own (`os.setpgrp`), so the worker's group
        alone would leave a horse running its job into the next test's Redis and Slack."""
        _signal([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
        proc.wait(10)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs)

    def stop(self) -> None:
        tree = {proc.pid: descendants(proc.pid) for proc in self.procs}
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # a warm shutdown: horses finish their job
        deadline = time.monotonic() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            _signal([proc.pid, *tree[proc.pid], *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (children first seen, then theirs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    """`sig` to each process's group and to the process (a horse may have left its parent's group)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
