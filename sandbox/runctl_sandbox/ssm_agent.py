"""The SSM agent of every sandbox instance: it really runs each script, as the agent does:
written to ``_script.sh``, run with ``sh`` in the agent's working directory with only the
agent's environment (``PATH``, ``AWS_SSM_*``, no ``HOME``), its process group killed when it
ends; and it keeps the records the SSM API answers from (runctl_sandbox/ssm.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from runctl_sandbox.wire import iso, now

# The agent's environment (amazon-ssm-agent executers.go prepareEnvironment): its own, which
# under systemd is only this PATH and no HOME (aws/amazon-ssm-agent issue 427), plus AWS_SSM_*.
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTANCE_ENV = "AWS_SSM_INSTANCE_ID"  # also how the sandbox finds an instance's processes
PLATFORM_NAME, PLATFORM_VERSION = "ubuntu", "22.04"
PLUGIN = "aws:runShellScript"
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000
PLUGIN_OUTPUT_LIMIT = 2_500

_ROOT_LINE = re.compile(r"^RUNCTL_ROOT=.*$", re.MULTILINE)
_FINAL = ("Success", "Failed", "TimedOut", "Cancelled")


def rewrite_root(script: str, root: Path) -> str:
    """Point the script's one ``RUNCTL_ROOT=`` line at ``root``."""
    line = f"RUNCTL_ROOT={shlex.quote(str(root))}"
    return _ROOT_LINE.sub(lambda _: line, script, count=1)


# --- invocations ----------------------------------------------------------------


@dataclass
class Invocation:
    command_id: str
    instance_id: str
    document_name: str
    comment: str
    requested: datetime
    status: str = "InProgress"
    status_details: str = "InProgress"
    response_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: datetime | None = None
    ended: datetime | None = None

    def get_result(self) -> dict[str, Any]:
        """The GetCommandInvocation response."""
        elapsed = ""
        if self.started is not None and self.ended is not None:
            elapsed = f"PT{(self.ended - self.started).total_seconds():.3f}S"
        return {
            "CommandId": self.command_id,
            "InstanceId": self.instance_id,
            "Comment": self.comment,
            "DocumentName": self.document_name,
            "DocumentVersion": "$DEFAULT",
            "PluginName": PLUGIN,
            "ResponseCode": self.response_code,
            "ExecutionStartDateTime": iso(self.started),
            "ExecutionElapsedTime": elapsed,
            "ExecutionEndDateTime": iso(self.ended),
            "Status": self.status,
            "StatusDetails": self.status_details,
            "StandardOutputContent": self.stdout,
            "StandardOutputUrl": "",
            "StandardErrorContent": self.stderr,
            "StandardErrorUrl": "",
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }

    def list_entry(self, details: bool) -> dict[str, Any]:
        """One ListCommandInvocations entry."""
        entry: dict[str, Any] = {
            "CommandId": self.command_id,
            "InstanceId": self.instance_id,
            "InstanceName": "",
            "Comment": self.comment,
            "DocumentName": self.document_name,
            "DocumentVersion": "$DEFAULT",
            "RequestedDateTime": self.requested.timestamp(),
            "Status": self.status,
            "StatusDetails": self.status_details,
            "TraceOutput": "",
            "StandardOutputUrl": "",
            "StandardErrorUrl": "",
            "CommandPlugins": [],
            "ServiceRole": "",
            "NotificationConfig": {
                "NotificationArn": "",
                "NotificationEvents": [],
                "NotificationType": "",
            },
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }
        if details:
            output = self.stdout
            if self.stderr:
                output += "\n----------ERROR-------\n" + self.stderr
            plugin: dict[str, Any] = {
                "Name": PLUGIN,
                "Status": self.status,
                "StatusDetails": self.status_details,
                "ResponseCode": self.response_code,
                "Output": output[:PLUGIN_OUTPUT_LIMIT],
                "StandardOutputUrl": "",
                "StandardErrorUrl": "",
                "OutputS3Region": "",
                "OutputS3BucketName": "",
                "OutputS3KeyPrefix": "",
            }
            if self.started is not None:
                plugin["ResponseStartDateTime"] = self.started.timestamp()
            if self.ended is not None:
                plugin["ResponseFinishDateTime"] = self.ended.timestamp()
            entry["CommandPlugins"] = [plugin]
        return entry


def _read_head(path: Path, limit: int) -> str:
    """The first ``limit`` characters of a file that may be huge."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit * 4)  # a UTF-8 character is at most 4 bytes
    except FileNotFoundError:
        return ""
    return raw.decode("utf-8", errors="replace")[:limit]


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _pids_with_env(entries: Collection[bytes]) -> list[int]:
    """Processes whose initial environment holds one of ``entries`` (``KEY=value``)."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            environ = Path("/proc", name, "environ").read_bytes()
        except OSError:
            continue
        if any(item in entries for item in environ.split(b"\0")):
            found.append(int(name))
    return found


def kill_instance_processes(instance_ids: Collection[str]) -> None:
    """SIGKILL every process started for these instances, detached ones included.

    Repeats until a scan finds none, so a shell forking while it dies is caught.
    """
    entries = {f"{INSTANCE_ENV}={iid}".encode() for iid in instance_ids}
    if not entries:
        return
    for _ in range(50):
        pids = _pids_with_env(entries)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


class Agent:
    """The SSM agent of every sandbox instance: runs scripts, keeps the records."""

    def __init__(self, root: Path, instance_dir: Callable[[str], Path]) -> None:
        self._work = root / "agent"
        self._instance_dir = instance_dir
        self._lock = threading.Lock()
        self._invocations: dict[tuple[str, str], Invocation] = {}
        self._scripts: dict[str, list[str]] = {}
        self._sent_at: dict[str, list[float]] = {}  # when each of those arrived (time.monotonic())
        self._shells: dict[tuple[str, str], int] = {}
        self._cancelled: set[tuple[str, str]] = set()
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        # instance id -> (seconds, text): each script containing text waits that long before it runs (a slow agent)
        self.delays: dict[str, tuple[float, str]] = {}
        # With a fake IMDS (runctl_sandbox/imds.py): the instance's metadata endpoint, standing
        # in for the link-local route to 169.254.169.254 (not part of the real agent's environment).
        self.metadata_endpoint: Callable[[str], str] | None = None

    # --- reading ---
    def invocation(self, command_id: str, instance_id: str) -> Invocation | None:
        with self._lock:
            inv = self._invocations.get((command_id, instance_id))
            return None if inv is None else replace(inv)

    def invocations(self, command_id: str | None = None) -> list[Invocation]:
        with self._lock:
            return [
                replace(inv) for inv in self._invocations.values() if command_id is None or inv.command_id == command_id
            ]

    def sent_scripts(self, instance_id: str) -> list[str]:
        with self._lock:
            return list(self._scripts.get(instance_id, []))

    def sent_log(self, instance_id: str) -> list[tuple[float, str]]:
        with self._lock:
            return list(zip(self._sent_at.get(instance_id, []), self._scripts.get(instance_id, []), strict=True))

    # --- running ---
    def working_dir(self, instance_id: str) -> Path:
        """Stands in for the agent's working directory, ``/`` under systemd."""
        path = self._work / instance_id / "cwd"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def environment(self, instance_id: str, region: str) -> dict[str, str]:
        """Exactly what a script sees from the agent."""
        env = {
            "PATH": AGENT_PATH,
            INSTANCE_ENV: instance_id,
            "AWS_SSM_REGION_NAME": region,
            "AWS_SSM_PLATFORM_NAME": PLATFORM_NAME,
            "AWS_SSM_PLATFORM_VERSION": PLATFORM_VERSION,
        }
        if self.metadata_endpoint is not None:
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = self.metadata_endpoint(instance_id)
        return env

    def run(self, inv: Invocation, script: str, timeout: float, region: str = "us-east-1") -> None:
        """Record ``inv`` as InProgress and run ``script`` for it in a thread."""
        script = rewrite_root(script, self._instance_dir(inv.instance_id))
        # Where the agent writes it: .../document/orchestration/<command-id>/awsrunShellScript/0.awsrunShellScript/
        work = self._work / inv.instance_id / "orchestration" / inv.command_id / "awsrunShellScript"
        work.mkdir(parents=True, exist_ok=True)
        path = work / "_script.sh"
        path.write_text(script)
        path.chmod(0o700)
        key = (inv.command_id, inv.instance_id)
        with self._lock:
            self._invocations[key] = inv
            self._scripts.setdefault(inv.instance_id, []).append(script)
            self._sent_at.setdefault(inv.instance_id, []).append(time.monotonic())
            thread = threading.Thread(
                target=self._execute,
                args=(key, work, self.environment(inv.instance_id, region), timeout),
                name=f"ssm-{inv.instance_id}-{inv.command_id[:8]}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def hold(self, inv: Invocation, delivery_timeout: float) -> None:
        """An unreachable agent: the command stays Pending until delivery times out."""
        inv.status = inv.status_details = "Pending"
        key = (inv.command_id, inv.instance_id)
        timer = threading.Timer(delivery_timeout, self._delivery_timed_out, args=(key,))
        timer.daemon = True
        with self._lock:
            self._invocations[key] = inv
            self._timers.append(timer)
        timer.start()

    def undeliverable(self, inv: Invocation) -> None:
        """SSM could not hand the command to the agent: terminal at once, nothing ran.
        (Status is an enum without Undeliverable, botocore's service model; it is in StatusDetails.)"""
        inv.status, inv.status_details, inv.ended = "Failed", "Undeliverable", now()
        with self._lock:
            self._invocations[(inv.command_id, inv.instance_id)] = inv

    def _delivery_timed_out(self, key: tuple[str, str]) -> None:
        with self._lock:
            inv = self._invocations[key]
            if inv.status == "Pending":
                inv.status, inv.status_details, inv.ended = "TimedOut", "DeliveryTimedOut", now()

    def _execute(self, key: tuple[str, str], work: Path, env: dict[str, str], timeout: float) -> None:
        try:
            self._run_shell(key, work, env, timeout)
        except BaseException as exc:  # never leave an invocation InProgress for ever
            self._finish(key, "Failed", "Failed", -1, stderr=f"sandbox agent error: {exc!r}")
            raise

    def _run_shell(self, key: tuple[str, str], work: Path, env: dict[str, str], timeout: float) -> None:
        with self._lock:
            self._invocations[key].started = now()
            delay, matching = self.delays.get(key[1], (0.0, ""))
            if matching and matching not in (work / "_script.sh").read_text():
                delay = 0.0
        if delay:
            time.sleep(delay)  # InProgress meanwhile, as with a slow or busy agent
        try:
            with (work / "stdout").open("wb") as out, (work / "stderr").open("wb") as err:
                # runshellscript.go runs `sh -c <script path>` (sh on the agent's PATH, as root);
                # `sh <path>` is the same script without exec'ing the file, which could meet
                # ETXTBSY while another thread's fork still holds it open for writing.
                shell = subprocess.Popen(
                    ["sh", str(work / "_script.sh")],
                    executable=shutil.which("sh", path=AGENT_PATH),
                    cwd=self.working_dir(key[1]),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        except OSError as exc:
            self._finish(key, "Failed", "Failed", -1, stderr=str(exc))
            return
        with self._lock:
            self._shells[key] = shell.pid
            if key in self._cancelled:  # cancelled while the shell was starting
                _killpg(shell.pid)
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _killpg(shell.pid)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        # Wait without reaping: while the shell is a zombie its pid still names
        # the process group, so the group kill below cannot hit a recycled pid.
        os.waitid(os.P_PID, shell.pid, os.WEXITED | os.WNOWAIT)
        timer.cancel()
        _killpg(shell.pid)  # what the agent does when the shell exits
        code = shell.wait()
        with self._lock:
            del self._shells[key]
            cancelled = key in self._cancelled
        if cancelled:
            self._finish(key, "Cancelled", "Cancelled", -1, work)
        elif timed_out.is_set():
            self._finish(key, "TimedOut", "ExecutionTimedOut", -1, work)
        elif code == 0:
            self._finish(key, "Success", "Success", 0, work)
        else:
            # Killed by a signal (e.g. the instance powered off): the agent reports -1.
            self._finish(key, "Failed", "Failed", code if code > 0 else -1, work)

    def _finish(
        self,
        key: tuple[str, str],
        status: str,
        details: str,
        code: int,
        work: Path | None = None,
        stderr: str = "",
    ) -> None:
        stdout = ""
        if work is not None:
            stdout = _read_head(work / "stdout", STDOUT_LIMIT)
            stderr = _read_head(work / "stderr", STDERR_LIMIT)
        with self._lock:
            inv = self._invocations[key]
            inv.status, inv.status_details, inv.response_code = status, details, code
            inv.stdout, inv.stderr, inv.ended = stdout, stderr[:STDERR_LIMIT], now()

    def cancel(self, command_id: str, instance_ids: Collection[str]) -> None:
        with self._lock:
            for key, inv in self._invocations.items():
                if inv.command_id != command_id or inv.status in _FINAL:
                    continue
                if instance_ids and inv.instance_id not in instance_ids:
                    continue
                self._cancelled.add(key)
                if inv.status == "Pending":
                    inv.status = inv.status_details = "Cancelled"
                    inv.ended = now()
                elif key in self._shells:
                    _killpg(self._shells[key])

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill every process started for any instance and wait for the runners."""
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            instance_ids = {inv.instance_id for inv in self._invocations.values()}
            for pgid in self._shells.values():
                _killpg(pgid)
            threads = list(self._threads)
        kill_instance_processes(instance_ids)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
