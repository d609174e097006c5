"""WSGI middleware in front of moto that makes SSM Run Command really run.

moto records ``SendCommand`` but executes nothing and lacks
``DescribeInstanceInformation`` and ``ListCommandInvocations``. The shim runs
each script the way the SSM agent does: written to ``_script.sh``, run with ``sh``
in the agent's working directory with only the agent's environment (``PATH``,
``AWS_SSM_*``, no ``HOME``), its process group killed when it ends; and answers the invocation APIs from
what really happened. EC2
``StopInstances``, ``TerminateInstances`` and ``RebootInstances`` also kill every
process started for those instances, as losing power would.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ssm.models import ssm_backends
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_input_stream

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# The agent's environment (amazon-ssm-agent executers.go prepareEnvironment): its own, which
# under systemd is only this PATH and no HOME (aws/amazon-ssm-agent issue 427), plus AWS_SSM_*.
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTANCE_ENV = "AWS_SSM_INSTANCE_ID"  # also how the sandbox finds an instance's processes
PLATFORM_NAME, PLATFORM_VERSION = "ubuntu", "22.04"
# "offline": ConnectionLost, commands stay Pending until delivery times out;
# "undeliverable": still Online to SSM, but every command ends Undeliverable without running
# (an agent that lost its connection before SSM noticed); "none": not managed by SSM.
SSM_TAG = "sandbox:ssm"
PLUGIN = "aws:runShellScript"
DOCUMENT = "AWS-RunShellScript"
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000
PLUGIN_OUTPUT_LIMIT = 2_500
DEFAULT_TIMEOUT = 3_600
PAGE_MAX = 50
AGENT_VERSION = "3.3.987.0"
POWER_OFF_ACTIONS = ("StopInstances", "TerminateInstances", "RebootInstances")

_ROOT_LINE = re.compile(r"^RUNCTL_ROOT=.*$", re.MULTILINE)
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/([^/]*)/([^/]*)/")
_INSTANCE_PARAM = re.compile(r"^InstanceId\.\d+$")
_FINAL = ("Success", "Failed", "TimedOut", "Cancelled")


class ApiError(Exception):
    def __init__(self, code: str, message: str = "", status: int = 400) -> None:
        super().__init__(message or code)
        self.code, self.message, self.status = code, message, status


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rewrite_root(script: str, root: Path) -> str:
    """Point the script's one ``RUNCTL_ROOT=`` line at ``root``."""
    line = f'RUNCTL_ROOT={shlex.quote(str(root))}'
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
            "ExecutionStartDateTime": _iso(self.started),
            "ExecutionElapsedTime": elapsed,
            "ExecutionEndDateTime": _iso(self.ended),
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
        self.exhausted: set[tuple[str, str]] = set()  # (instance type, zone) with no capacity
        # instance id -> (seconds, text): each script containing text waits that long before it runs (a slow agent)
        self.delays: dict[str, tuple[float, str]] = {}
        # With a fake IMDS (workers/sandbox/imds.py): the instance's metadata endpoint, standing
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
        inv.status, inv.status_details, inv.ended = "Failed", "Undeliverable", _now()
        with self._lock:
            self._invocations[(inv.command_id, inv.instance_id)] = inv

    def _delivery_timed_out(self, key: tuple[str, str]) -> None:
        with self._lock:
            inv = self._invocations[key]
            if inv.status == "Pending":
                inv.status, inv.status_details, inv.ended = "TimedOut", "DeliveryTimedOut", _now()

    def _execute(self, key: tuple[str, str], work: Path, env: dict[str, str], timeout: float) -> None:
        try:
            self._run_shell(key, work, env, timeout)
        except BaseException as exc:  # never leave an invocation InProgress for ever
            self._finish(key, "Failed", "Failed", -1, stderr=f"sandbox agent error: {exc!r}")
            raise

    def _run_shell(self, key: tuple[str, str], work: Path, env: dict[str, str], timeout: float) -> None:
        with self._lock:
            self._invocations[key].started = _now()
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
            inv.stdout, inv.stderr, inv.ended = stdout, stderr[:STDERR_LIMIT], _now()

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
                    inv.ended = _now()
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


# --- EC2 state, read from moto's backend ------------------------------------------


SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


@dataclass(frozen=True)
class Ec2Instance:
    id: str
    state: str
    tags: dict[str, str]
    private_ip: str
    # The policies of its instance profile's roles; None without a profile (the sandbox then
    # stands for an account with Default Host Management Configuration).
    profile_policies: frozenset[str] | None = None

    @property
    def ssm(self) -> str:
        """``online``, ``offline`` or ``none`` (not registered with SSM)."""
        if self.state != "running":
            return "none"
        if self.profile_policies is not None and SSM_CORE_POLICY not in self.profile_policies:
            return "none"  # the agent gets no credentials to register with
        knob = self.tags.get(SSM_TAG, "online")
        return knob if knob in ("offline", "undeliverable", "none") else "online"


def _profile_policies(backend: Any, instance_id: str) -> frozenset[str] | None:
    association = backend.iam_instance_profile_associations.get(instance_id)
    if association is None:
        return None
    roles = association.iam_instance_profile.roles or []
    return frozenset(arn for role in roles for arn in role.managed_policies)


def ec2_instances(account_id: str, region: str) -> dict[str, Ec2Instance]:
    try:
        backend = ec2_backends[account_id][region]
    except KeyError:  # a region moto does not know has no instances
        return {}
    for _ in range(5):
        try:
            return {
                inst.id: Ec2Instance(
                    id=str(inst.id),
                    state=str(inst.state),
                    tags=dict(backend.tags.get(inst.id, {})),
                    private_ip=str(inst.private_ip or ""),
                    profile_policies=_profile_policies(backend, inst.id),
                )
                for inst in backend.all_instances()
            }
        except RuntimeError:  # moto's dicts changed under us (another request thread)
            time.sleep(0.01)
    raise ApiError("InternalServerError", "EC2 state kept changing", 500)


def one_time_spot(account_id: str, region: str, instance_id: str) -> bool:
    """A spot instance whose request is one-time (or unknown: RunInstances' spot
    market options default to one-time) cannot be stopped."""
    try:
        backend = ec2_backends[account_id][region]
        inst = backend.get_instance(instance_id)
    except Exception:  # unknown ids: moto answers for them
        return False
    if getattr(inst, "lifecycle", None) != "spot":
        return False
    for request in list(backend.spot_instance_requests.values()):
        if getattr(request, "instance", None) is not None and request.instance.id == instance_id:
            return str(request.type) != "persistent"
    return True


def _ec2_error(start_response: StartResponse, code: str, message: str, status: int = 400) -> Iterable[bytes]:
    """An error in EC2's query-protocol XML."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()
    headers = [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
    return _reply(start_response, f"{status} {HTTP_STATUS_CODES[status]}", headers, body)


# --- the middleware -----------------------------------------------------------------


@dataclass(frozen=True)
class RequestContext:
    """Who asked, where: parsed from the SigV4 credential scope, like moto does."""

    region: str
    service: str
    access_key: str
    account_header: str

    @property
    def account_id(self) -> str:
        if os.environ.get("MOTO_ACCOUNT_ID"):
            return os.environ["MOTO_ACCOUNT_ID"]
        if self.account_header:
            return self.account_header
        if self.access_key:
            from moto.iam.models import get_account_id_from

            return str(get_account_id_from(self.access_key))
        return str(DEFAULT_ACCOUNT_ID)


def _context(environ: WSGIEnvironment, default_region: str) -> RequestContext:
    match = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    return RequestContext(
        region=match.group(2) if match else default_region,
        service=match.group(3) if match else "",
        access_key=match.group(1) if match else "",
        account_header=environ.get("HTTP_X_MOTO_ACCOUNT_ID", ""),
    )


def _read_body(environ: WSGIEnvironment) -> bytes:
    body: bytes = get_input_stream(environ).read()
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _call_app(app: WSGIApplication, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes]:
    captured: list[Any] = []
    chunks: list[bytes] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, headers]
        return chunks.append

    result = app(environ, start)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured[0], captured[1], b"".join(chunks)


def _reply(start_response: StartResponse, status: str, headers: list[tuple[str, str]], body: bytes) -> Iterable[bytes]:
    start_response(status, headers)
    return [body]


def _json_reply(start_response: StartResponse, payload: Any, code: int = 200) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    headers = [
        ("Content-Type", "application/x-amz-json-1.1"),
        ("Content-Length", str(len(body))),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ]
    return _reply(start_response, f"{code} {HTTP_STATUS_CODES[code]}", headers, body)


def _page(items: list[Any], payload: dict[str, Any], low: int) -> tuple[list[Any], str | None]:
    size = payload.get("MaxResults", PAGE_MAX)
    if not isinstance(size, int) or not low <= size <= PAGE_MAX:
        raise ApiError("ValidationException", f"MaxResults must be between {low} and {PAGE_MAX}")
    start = 0
    if payload.get("NextToken"):
        try:
            start = int(base64.urlsafe_b64decode(str(payload["NextToken"])).decode())
        except (ValueError, binascii.Error) as exc:
            raise ApiError("InvalidNextToken", "The specified token is not valid") from exc
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else None
    return items[start:end], token


def _pin_moto_command(ctx: RequestContext, command_id: str, instance_ids: list[str]) -> None:
    command = ssm_backends[ctx.account_id][ctx.region].get_command_by_id(command_id)
    command.instance_ids = list(instance_ids)
    command.target_count = command.completed_count = len(instance_ids)
    command.invocations = [command.invocation_response(iid, PLUGIN) for iid in instance_ids]


def _int_param(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ApiError("InvalidParameters", f"{name} must be a whole number of seconds") from exc


class S3Gate:
    """What S3 does to presigned requests that moto lets through: buckets created since June
    2020 refuse SigV2 (400 InvalidRequest); a URL past its X-Amz-Date + X-Amz-Expires is
    refused (403 AccessDenied, "Request has expired"); a PUT needs a Content-Length (411
    MissingContentLength: no chunked uploads) and holds at most 5 GB (400 EntityTooLarge);
    and a new bucket outside us-east-1 answers 307 Temporary Redirect until DNS settles
    (``redirect_next``, GETs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._redirects = 0
        self._expired = False
        self.seen: list[str] = []  # the query strings of presigned GETs and PUTs, oldest first
        self.puts: list[str] = []  # those of presigned PUTs

    def redirect_next(self, count: int = 1) -> None:
        with self._lock:
            self._redirects += count

    def expire_next(self) -> None:
        """The next presigned request arrives after its URL expired."""
        with self._lock:
            self._expired = True

    def check(self, environ: WSGIEnvironment) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """An answer instead of moto's, or None to pass the request on."""
        query = environ.get("QUERY_STRING", "")
        params = parse_qs(query)
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD", "PUT") or environ.get("HTTP_AUTHORIZATION"):
            return None
        if not ({"X-Amz-Signature", "Signature", "AWSAccessKeyId"} & params.keys()):
            return None
        with self._lock:
            self.seen.append(query)
            if method == "PUT":
                self.puts.append(query)
        if params.get("X-Amz-Algorithm") != ["AWS4-HMAC-SHA256"]:
            return 400, [], _s3_error(
                "InvalidRequest",
                "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
            )
        with self._lock:
            expired, self._expired = self._expired, False
        if expired or _past_expiry(params):
            return 403, [], _s3_error("AccessDenied", "Request has expired")
        if method == "PUT":
            length = str(environ.get("CONTENT_LENGTH") or "")
            if not length.isdigit():
                return 411, [], _s3_error("MissingContentLength", "You must provide the Content-Length HTTP header.")
            if int(length) > MAX_PUT_BYTES:
                return 400, [], _s3_error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
            return None
        with self._lock:
            redirect = self._redirects > 0
            self._redirects -= redirect
        if redirect:
            location = f"http://{environ.get('HTTP_HOST', '')}{environ.get('PATH_INFO', '')}?{query}"
            body = _s3_error(
                "TemporaryRedirect",
                "Please re-send this request to the specified temporary endpoint. "
                "Continue to use the original request endpoint for future requests.",
            )
            return 307, [("Location", location)], body
        return None


MAX_PUT_BYTES = 5 * 1024**3  # one PUT; larger objects go up in parts


def _past_expiry(params: dict[str, list[str]]) -> bool:
    """SigV4 query auth: valid from X-Amz-Date for X-Amz-Expires seconds."""
    try:
        signed = datetime.strptime(params["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        seconds = int(params["X-Amz-Expires"][0])
    except (KeyError, ValueError):
        return False
    return datetime.now(UTC) > signed + timedelta(seconds=seconds)


def _s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


class PriceList:
    """The Price List API (``pricing:GetProducts``), which moto lacks: entries shaped like
    AWS's (product attributes, OnDemand terms), empty until ``set``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []
        self.denied = False
        self.calls = 0

    def set(self, region: str, instance_type: str, usd_per_hour: str) -> None:
        sku = uuid.uuid4().hex[:16].upper()
        attributes = {
            "instanceType": instance_type,
            "regionCode": region,
            "operatingSystem": "Linux",
            "tenancy": "Shared",
            "preInstalledSw": "NA",
            "capacitystatus": "Used",
            "licenseModel": "No License required",
        }
        term = {
            "sku": sku,
            "offerTermCode": "JRTCKXETXF",
            "priceDimensions": {
                f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": "Hrs",
                    "pricePerUnit": {"USD": usd_per_hour},
                    "description": f"${usd_per_hour} per On Demand Linux {instance_type} Instance Hour",
                }
            },
        }
        item = {
            "product": {"productFamily": "Compute Instance", "attributes": attributes, "sku": sku},
            "serviceCode": "AmazonEC2",
            "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": term}},
            "publicationDate": _iso(_now()),
        }
        with self._lock:
            self._items.append(item)

    def reset(self) -> None:
        with self._lock:
            self._items.clear()
            self.denied, self.calls = False, 0

    def get_products(self, payload: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            if self.denied:
                raise ApiError(
                    "AccessDeniedException", "User is not authorized to perform: pricing:GetProducts", 400
                )
            if payload.get("ServiceCode") != "AmazonEC2":
                return {"FormatVersion": "aws_v1", "PriceList": []}
            wanted = [(f.get("Field"), f.get("Value")) for f in payload.get("Filters") or []]
            found = [
                json.dumps(item)
                for item in self._items
                if all(item["product"]["attributes"].get(field) == value for field, value in wanted)
            ]
        return {"FormatVersion": "aws_v1", "PriceList": found}


class SsmShim:
    """The WSGI middleware; ``app`` is moto's dispatcher."""

    def __init__(
        self,
        app: WSGIApplication,
        agent: Agent,
        default_region: str,
        s3: S3Gate | None = None,
        prices: PriceList | None = None,
    ) -> None:
        self._app = app
        self._agent = agent
        self._default_region = default_region
        self._s3 = s3 or S3Gate()
        self._prices = prices or PriceList()
        self._handlers: dict[str, Callable[[WSGIEnvironment, RequestContext, dict[str, Any]], Any]] = {
            "AmazonSSM.SendCommand": self._send_command,
            "AmazonSSM.GetCommandInvocation": self._get_command_invocation,
            "AmazonSSM.ListCommandInvocations": self._list_command_invocations,
            "AmazonSSM.DescribeInstanceInformation": self._describe_instance_information,
            "AmazonSSM.CancelCommand": self._cancel_command,
            "AWSPriceListService.GetProducts": lambda environ, ctx, payload: self._prices.get_products(payload),
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        handler = self._handlers.get(environ.get("HTTP_X_AMZ_TARGET", ""))
        ctx = _context(environ, self._default_region)
        s3_answer = self._s3.check(environ) if handler is None else None
        if s3_answer is not None:
            code, headers, body = s3_answer
            headers = [*headers, ("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            return _reply(start_response, f"{code} {HTTP_STATUS_CODES[code]}", headers, body)
        try:
            if handler is not None:
                try:
                    payload = json.loads(_read_body(environ) or b"{}")
                except ValueError as exc:
                    raise ApiError("SerializationException", "the body is not JSON") from exc
                result = handler(environ, ctx, payload)
                if isinstance(result, tuple):  # moto's own response, passed on
                    return _reply(start_response, *result)
                return _json_reply(start_response, result)
            if ctx.service == "ec2":
                return self._ec2(environ, ctx, start_response)
        except ApiError as err:
            return _json_reply(start_response, {"__type": err.code, "message": err.message}, err.status)
        return self._app(environ, start_response)

    # --- EC2 ---
    def _capacity(self, ctx: RequestContext, params: dict[str, list[str]]) -> bytes | None:
        """EC2's InsufficientInstanceCapacity (a 500, "Server." error) for a zone made full
        with ``Sandbox.exhaust``."""
        itype = params.get("InstanceType", [""])[0]
        zone = params.get("Placement.AvailabilityZone", [""])[0]
        subnet = params.get("SubnetId", [""])[0]
        if subnet:
            try:
                zone = str(ec2_backends[ctx.account_id][ctx.region].get_subnet(subnet).availability_zone)
            except Exception:  # moto answers for an unknown subnet itself
                return None
        zone = zone or ctx.region + "a"
        if (itype, zone) not in self._agent.exhausted:
            return None
        message = (f"We currently do not have sufficient {itype} capacity in the Availability Zone you requested "
                   f"({zone}). Our system will be working on provisioning additional capacity.")
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity'
            f"</Code><Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()

    def _ec2(self, environ: WSGIEnvironment, ctx: RequestContext, start_response: StartResponse) -> Iterable[bytes]:
        body = _read_body(environ)
        params = parse_qs(environ.get("QUERY_STRING", "")) | parse_qs(body.decode("utf-8", "replace"))
        action = params.get("Action", [""])[0]
        if action == "RunInstances":
            refusal = self._capacity(ctx, params)
            if refusal is not None:
                return _reply(start_response, "500 Internal Server Error", [("Content-Type", "text/xml")], refusal)
        if action == "StopInstances":
            for iid in (v[0] for k, v in params.items() if _INSTANCE_PARAM.match(k)):
                if one_time_spot(ctx.account_id, ctx.region, iid):
                    return _ec2_error(
                        start_response,
                        "UnsupportedOperation",
                        f"You can't stop the Spot Instance '{iid}' because it is associated with a one-time "
                        "Spot Instance request. You can only stop Spot Instances associated with persistent "
                        "Spot Instance requests.",
                    )
        status, headers, reply = _call_app(self._app, environ)
        if action in POWER_OFF_ACTIONS and status.startswith("200"):
            ids = [v[0] for k, v in params.items() if _INSTANCE_PARAM.match(k)]
            kill_instance_processes(ids)
        return _reply(start_response, status, headers, reply)

    # --- SSM ---
    def _send_command(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        document = str(payload.get("DocumentName", ""))
        if document != DOCUMENT:
            raise ApiError("InvalidDocument", f"the sandbox only runs {DOCUMENT}, not {document!r}")
        parameters = payload.get("Parameters") or {}
        commands = parameters.get("commands")
        if not isinstance(commands, list) or not commands:
            raise ApiError("InvalidParameters", "Parameters.commands is required")
        timeout = _int_param(parameters.get("executionTimeout", [DEFAULT_TIMEOUT])[0], "executionTimeout")
        delivery = DEFAULT_TIMEOUT
        if payload.get("TimeoutSeconds") is not None:
            # Stricter than AWS, where TimeoutSeconds only bounds delivery.
            delivery = _int_param(payload["TimeoutSeconds"], "TimeoutSeconds")
            timeout = min(timeout, delivery)

        known = ec2_instances(ctx.account_id, ctx.region)
        requested = list(dict.fromkeys(str(i) for i in payload.get("InstanceIds") or []))
        bad = [iid for iid in requested if iid not in known or known[iid].ssm == "none"]
        if bad:
            raise ApiError(
                "InvalidInstanceId",
                f"Instances {bad} not in a valid state for account {ctx.account_id}",
            )

        status, headers, body = _call_app(self._app, environ)
        if not status.startswith("200"):
            return status, headers, body
        command = json.loads(body)["Command"]
        targeted: list[str] = []
        if payload.get("Targets"):
            # moto resolved the Targets into InstanceIds (unordered).
            targeted = [
                iid
                for iid in command.get("InstanceIds", [])
                if iid not in requested and iid in known and known[iid].ssm != "none"
            ]
        else:
            # Without Targets moto adds every EC2 instance to the command, which
            # breaks ListCommands(InstanceId=...): keep only the ones asked for.
            _pin_moto_command(ctx, str(command["CommandId"]), requested)
            command.update(InstanceIds=requested, TargetCount=len(requested), CompletedCount=len(requested))
            body = json.dumps({"Command": command}).encode()
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        script = "\n".join(str(line) for line in commands)
        requested_at = _now()
        for iid in requested + targeted:
            inv = Invocation(
                command_id=str(command["CommandId"]),
                instance_id=iid,
                document_name=document,
                comment=str(payload.get("Comment", "")),
                requested=requested_at,
            )
            if known[iid].ssm == "offline":
                self._agent.hold(inv, delivery)
            elif known[iid].ssm == "undeliverable":
                self._agent.undeliverable(inv)
            else:
                self._agent.run(inv, script, timeout, ctx.region)
        return status, headers, body

    def _get_command_invocation(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        plugin = payload.get("PluginName")
        if plugin not in (None, PLUGIN):
            raise ApiError("InvalidPluginName", f"no plugin {plugin!r} in this invocation")
        inv = self._agent.invocation(str(payload.get("CommandId")), str(payload.get("InstanceId")))
        if inv is None:
            raise ApiError("InvocationDoesNotExist")
        return inv.get_result()

    def _list_command_invocations(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        command_id = payload.get("CommandId")
        invocations = self._agent.invocations(str(command_id) if command_id else None)
        if command_id and not invocations:
            raise ApiError("InvalidCommandId")
        if payload.get("InstanceId"):
            invocations = [i for i in invocations if i.instance_id == payload["InstanceId"]]
        for flt in payload.get("Filters") or []:
            field = {"Status": "status", "DocumentName": "document_name"}.get(flt.get("key"))
            if field is None:
                raise ApiError("InvalidFilterKey", f"the sandbox cannot filter on {flt.get('key')!r}")
            invocations = [i for i in invocations if getattr(i, field) == flt.get("value")]
        # Newest command first, like AWS; within a command the instances keep their order.
        invocations.sort(key=lambda i: i.requested, reverse=True)
        page, token = _page(invocations, payload, low=1)
        result: dict[str, Any] = {"CommandInvocations": [i.list_entry(bool(payload.get("Details"))) for i in page]}
        if token:
            result["NextToken"] = token
        return result

    def _describe_instance_information(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        now = _now()
        infos = [
            {
                "InstanceId": inst.id,
                "PingStatus": "ConnectionLost" if inst.ssm == "offline" else "Online",
                "LastPingDateTime": (now - timedelta(minutes=30) if inst.ssm == "offline" else now).timestamp(),
                "AgentVersion": AGENT_VERSION,
                "IsLatestVersion": True,
                "PlatformType": "Linux",
                "PlatformName": "Ubuntu",
                "PlatformVersion": "22.04",
                "ResourceType": "EC2Instance",
                "IPAddress": inst.private_ip,
                "ComputerName": f"ip-{inst.private_ip.replace('.', '-')}.ec2.internal",
                "SourceId": inst.id,
                "SourceType": "AWS::EC2::Instance",
            }
            for inst in ec2_instances(ctx.account_id, ctx.region).values()
            if inst.ssm != "none"
        ]
        wanted: list[tuple[str, list[str]]] = [
            (str(f.get("Key")), list(f.get("Values") or [])) for f in payload.get("Filters") or []
        ] + [
            (str(f.get("key")), list(f.get("valueSet") or []))
            for f in payload.get("InstanceInformationFilterList") or []
        ]
        fields = {
            "InstanceIds": "InstanceId",
            "PingStatus": "PingStatus",
            "PlatformTypes": "PlatformType",
            "ResourceType": "ResourceType",
        }
        for key, values in wanted:
            if key not in fields:
                raise ApiError("InvalidFilterKey", f"the sandbox cannot filter on {key!r}")
            infos = [info for info in infos if info[fields[key]] in values]
        page, token = _page(infos, payload, low=5)
        result: dict[str, Any] = {"InstanceInformationList": page}
        if token:
            result["NextToken"] = token
        return result

    def _cancel_command(self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        command_id = str(payload.get("CommandId"))
        if not self._agent.invocations(command_id):
            raise ApiError("InvalidCommandId")
        self._agent.cancel(command_id, [str(i) for i in payload.get("InstanceIds") or []])
        return {}
