"""The console demo: the whole bot on this machine, no Slack, AWS or Redis server.

fakeredis in-process, the AWS sandbox (moto + the executing-SSM shim), a fake
Slack Web API and an in-process worker. Each typed `/runctl ...` line goes through
the same Bolt app (`app.dispatch`) with a signed request; posted messages print as
text, and a button is clicked by typing its number (Errbot's text backend and
Hubot's shell adapter work the same way).
"""

from __future__ import annotations

import argparse
import faulthandler
import html
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import fakeredis
from croniter import croniter  # rq's cron uses it: the clock's cron expressions, as rq reads them
from redis import Redis
from rq import Queue
from slack_bolt import App
from slack_bolt.request import BoltRequest
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier

from bot.app import build_app
from runctl_sandbox.aws import LaunchSeed, Sandbox, SeedInfo, seed, seed_launch
from runctl_sandbox.example_repo import EXAMPLE_SCRIPTS, make_example_repo
from runctl_sandbox.fake_slack import FakeSlack, Message, UploadedFile
from runctl_sandbox.inline import InlineWorker
from workers import services
from workers.services import Services
from workers.settings import Settings
from workers.slack.client import Notifier

SECRET = "console-signing-secret"
TOKEN = "xoxb-console"
CHANNEL = "C0CONSOLE"
USER = "U0YOU"
_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")
_DATE = re.compile(r"<!date\^\d+\^[^|]*\|([^>]*)>")
_CHANNEL = re.compile(r"<#([A-Z0-9]+)(?:\|[^>]*)?>")
STOP_GRACE_SECONDS = 30  # the console's; a deployment's default is 120 (README, RUNCTL_STOP_GRACE_SECONDS)
FAST_FACTOR = 600.0  # `--fast` alone: ten minutes a second while nothing trains
LOG_LINES = 12  # the last lines of a shared file ([Full log]) the console shows


def sign(body: str) -> dict[str, str | Sequence[str]]:
    ts = str(int(time.time()))
    return {
        "content-type": "application/x-www-form-urlencoded",
        "x-slack-request-timestamp": ts,
        "x-slack-signature": SignatureVerifier(SECRET).generate_signature(timestamp=ts, body=body) or "",
    }


def plain(text: str) -> str:
    """mrkdwn as Slack shows it: mentions and dates by name, `&lt;` as `<`."""
    text = _MENTION.sub(lambda m: "@" + m.group(1).lower().removeprefix("u0"), text)
    text = _CHANNEL.sub(lambda m: "#" + m.group(1), text)
    return html.unescape(_DATE.sub(lambda m: m.group(1), text))


def slack_escaped(typed: str) -> str:
    """A typed command as Slack sends it (`should_escape`): `&`, `<` and `>` escaped."""
    return typed.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Console:
    def __init__(self, out: TextIO, user: str = USER, files: Path | None = None) -> None:
        self.out = out
        self.user = user
        self.files = files  # where shared files ([Full log]) are written; None: not kept
        self.buttons: list[tuple[Message, dict[str, Any], dict[str, Any]]] = []
        self.numbers: dict[tuple[str, str, str, str], int] = {}  # a button keeps its number across updates
        self.shown: dict[tuple[str, str], list[str]] = {}  # each message's last rendering
        self.lock = threading.RLock()
        self.reading: str | None = None  # the prompt being answered at a terminal, if any

    # --- rendering ------------------------------------------------------------
    def show(self, kind: str, msg: Message | UploadedFile) -> None:
        if isinstance(msg, UploadedFile):
            if kind == "file":
                self.show_file(msg)
            return
        if kind == "delete":
            return
        private = msg.ephemeral or kind == "response_url"
        where = "only you" if private else ("thread" if msg.thread_ts else f"#{msg.channel}")
        with self.lock:
            lines = self.render(msg)
            key = (msg.channel, msg.ts)
            before = self.shown.get(key)
            self.shown[key] = lines
            if kind == "update" and before is not None:
                # An update shows what changed, one line each; an unchanged rendering shows nothing.
                changed = [line for line in lines if line not in before]
                if not changed:
                    return
                self.say(f"[{where} (updated)] " + changed[0] + "".join("\n    " + line for line in changed[1:]))
                return
            tag = " (updated)" if kind == "update" else ""
            self.say(f"[{where}{tag}] " + (lines[0] if lines else "") + "".join("\n    " + line for line in lines[1:]))

    def show_file(self, file: UploadedFile) -> None:
        """A shared file ([Full log]): where the console put it, and its last lines."""
        where = ""
        if self.files is not None:
            self.files.mkdir(parents=True, exist_ok=True)
            path = self.files / f"{file.id}-{Path(file.filename).name}"
            path.write_bytes(file.content)
            where = f", saved as {path}"
        try:
            text = file.content.decode()
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:  # a chart (the digest's PNG): not for a terminal
            self.say(f"[file] {file.filename}: {file.title or 'an image'}, {len(file.content)} bytes{where}")
            return
        lines = text.splitlines()
        tail = lines[-LOG_LINES:]
        head = f"[file] {file.filename}: {len(lines)} lines{where}"
        head += f"; the last {len(tail)}:" if len(tail) < len(lines) else ":"
        self.say(head + "".join("\n    | " + line for line in tail))

    def render(self, msg: Message) -> list[str]:
        if not msg.blocks:
            return plain(msg.text).splitlines() or [""]
        lines: list[str] = []
        for block in msg.blocks:
            kind = block.get("type")
            if kind in ("section", "header"):
                text = (block.get("text") or {}).get("text", "")
                lines += plain(text).splitlines()
                for field in block.get("fields") or []:
                    lines += plain(field.get("text", "")).splitlines()
            elif kind == "context":
                lines += [plain(e.get("text", "")) for e in block.get("elements", []) if "text" in e]
            elif kind == "actions":
                labels = []
                for element in block.get("elements", []):
                    if element.get("type") == "button":
                        labels.append(f"[{self.number(msg, block, element)}] {element['text']['text']}")
                lines.append("  ".join(labels) + "   (type the number to click)")
            elif kind == "divider":
                lines.append("-" * 20)
        return lines

    def number(self, msg: Message, block: dict[str, Any], element: dict[str, Any]) -> int:
        """The button's number: the same one for as long as its message shows it."""
        key = (msg.channel, msg.ts, str(element.get("action_id")), str(element.get("value", "")))
        with self.lock:
            found = self.numbers.get(key)
            if found is not None:
                self.buttons[found - 1] = (msg, block, element)  # the newest rendering's message
                return found
            self.buttons.append((msg, block, element))
            self.numbers[key] = len(self.buttons)
            return len(self.buttons)

    def say(self, text: str) -> None:
        """Print; at a terminal with a half-typed line, above it, then the prompt and what was
        typed drawn again (as readline's own redisplay after a message would)."""
        with self.lock:
            if self.reading is None:
                print(text, file=self.out, flush=True)
                return
            try:
                import readline

                typed = readline.get_line_buffer()
            except ImportError:  # pragma: no cover - a Python without readline
                typed = ""
            self.out.write("\r\x1b[K" + text + "\n" + self.reading + typed)
            self.out.flush()

    # --- input ----------------------------------------------------------------
    def command(self, app: App, text: str) -> None:
        body = urlencode(
            {
                "team_id": "T0CONSOLE",
                "channel_id": CHANNEL,
                "channel_name": "console",
                "user_id": self.user,
                "user_name": "you",
                "command": "/runctl",
                "text": slack_escaped(text),
                "api_app_id": "A0RUNCTL",
                "response_url": "",
                "trigger_id": f"{time.monotonic_ns()}.{int(time.time())}.c0501e",
            }
        )
        resp = app.dispatch(BoltRequest(body=body, headers=sign(body)))
        if resp.status != 200:
            self.say(f"[http {resp.status}] {resp.body}")
            return
        if resp.body:
            try:
                data = json.loads(resp.body)
            except ValueError:
                data = {"text": resp.body}
            self.say("[only you] " + plain(str(data.get("text", ""))).replace("\n", "\n    "))

    def click(self, app: App, number: int, ask: Callable[[str], str | None] | None = None) -> None:
        if not 1 <= number <= len(self.buttons):
            self.say(f"No button [{number}].")
            return
        msg, block, element = self.buttons[number - 1]
        confirm = element.get("confirm")
        if confirm and ask is not None and not self.confirmed(confirm, ask):
            self.say("Not clicked.")
            return
        payload = {
            "type": "block_actions",
            "team": {"id": "T0CONSOLE", "domain": "console"},
            "user": {"id": self.user, "username": "you", "team_id": "T0CONSOLE"},
            "api_app_id": "A0RUNCTL",
            "container": {"type": "message", "message_ts": msg.ts, "channel_id": msg.channel},
            "trigger_id": f"{time.monotonic_ns()}.{int(time.time())}.c0501e",
            "channel": {"id": msg.channel, "name": "console"},
            "message": {"ts": msg.ts, "text": msg.text, "blocks": msg.blocks},
            "response_url": "",
            "actions": [
                {
                    "type": "button",
                    "action_id": element.get("action_id"),
                    "block_id": block.get("block_id", ""),
                    "text": element.get("text"),
                    "value": element.get("value", ""),
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        body = urlencode({"payload": json.dumps(payload)})
        resp = app.dispatch(BoltRequest(body=body, headers=sign(body)))
        if resp.status != 200:
            self.say(f"[http {resp.status}] {resp.body}")

    def confirmed(self, confirm: dict[str, Any], ask: Callable[[str], str | None]) -> bool:
        """The button's confirmation dialog, as Slack shows it before sending the click."""
        title = (confirm.get("title") or {}).get("text", "Are you sure?")
        text = (confirm.get("text") or {}).get("text", "")
        yes = (confirm.get("confirm") or {}).get("text", "Yes")
        no = (confirm.get("deny") or {}).get("text", "Cancel")
        self.say(f"[confirm] {title}\n    {plain(text)}")
        answer = ask(f"{yes}? [y/N] ({no}: Enter) ")
        return (answer or "").strip().lower() in ("y", "yes")


class Prompt:
    """Typed lines: on a terminal with a prompt, readline's editing and history (up arrow);
    piped, plain lines, each echoed once so a transcript shows what was typed."""

    def __init__(self, stdin: TextIO, console: Console | None = None) -> None:
        self.stdin = stdin
        self.console = console
        self.tty = stdin.isatty()
        if self.tty:
            import readline  # noqa: F401  (imported for its effect: input() edits and keeps history)

    def read(self, prompt: str = "runctl> ") -> str | None:
        """The next line, None at the end of input; Ctrl-C raises KeyboardInterrupt."""
        if self.tty:
            if self.console is not None:
                with self.console.lock:
                    self.console.reading = prompt  # messages meanwhile go above the line being typed
            try:
                return input(prompt)
            except EOFError:
                return None
            finally:
                if self.console is not None:
                    with self.console.lock:
                        self.console.reading = None
        line = self.stdin.readline()
        return None if line == "" else line


# --- the clock ------------------------------------------------------------------------


class Clock:
    """The console's "now" (the bot's `Services.clock` and the sandbox's LaunchTime): real
    time, or with `--fast FACTOR` real time that runs FACTOR times as fast while nothing
    trains. A live run's polls and its Slack updates keep real time: only idle time is
    compressed, so an idle instance meets its autostop, its warnings and the digest."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = max(1.0, factor)
        self.offset = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def now(self) -> datetime:
        with self.lock:
            return datetime.fromtimestamp(time.time() + self.offset, UTC)

    def beat(self, compress: bool) -> None:
        with self.lock:
            mono = time.monotonic()
            if compress:
                self.offset += (mono - self.last) * (self.factor - 1)
            self.last = mono


@dataclass
class ClockJob:
    """One entry of the clock process's schedule (workers/cron.py), as rq cron registered it."""

    name: str
    func: Callable[..., Any]
    queue: str
    args: tuple[Any, ...]
    interval: float | None
    cron: str | None
    timeout: int | None
    ttl: int | None
    due: datetime
    real_next: float = 0.0

    def advance(self, now: datetime) -> None:
        if self.cron:
            self.due = croniter(self.cron, now).get_next(datetime)
        else:
            self.due = now + timedelta(seconds=self.interval or 60)
        self.real_next = time.monotonic() + MIN_REAL_SECONDS


MIN_REAL_SECONDS = 2.0  # a clock job runs at most this often in real time, however fast the clock


def clock_jobs(now: datetime) -> list[ClockJob]:
    """workers/cron.py's schedule: the module the `clock` process hands to `rq cron`, read
    through rq's own registry, so the console runs exactly what production schedules."""
    from rq import cron as rq_cron

    start = len(rq_cron._job_data_registry)
    module = importlib.import_module("workers.cron")
    if len(rq_cron._job_data_registry) == start:  # imported before: register again
        importlib.reload(module)
    jobs = []
    for data in rq_cron._job_data_registry[start:]:
        job = ClockJob(
            name=str(data["name"] or data["func"].__name__),
            func=data["func"],
            queue=str(data["queue_name"]),
            args=tuple(data["args"] or ()),
            interval=data["interval"],
            cron=data["cron"],
            timeout=data["job_timeout"],
            ttl=data["ttl"],
            due=now,
        )
        job.advance(now)  # the first run one interval (or the cron's next time) after the start
        job.real_next = 0.0
        jobs.append(job)
    del rq_cron._job_data_registry[start:]
    return jobs


class ClockThread:
    """The `clock` process, in the console: queues each clock job when it is due by the console's clock."""

    def __init__(self, clock: Clock, svc: Services, redis: Redis) -> None:
        self.clock, self.svc, self.redis = clock, svc, redis
        self.jobs = clock_jobs(clock.now())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="console-clock", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.beat()
            except Exception as exc:  # the console goes on; the next beat tries again
                print(f"[clock] {type(exc).__name__}: {exc}", file=sys.stderr)

    def beat(self) -> None:
        self.clock.beat(compress=not self.svc.runs.live())
        now = self.clock.now()
        for job in self.jobs:
            if now >= job.due and time.monotonic() >= job.real_next:
                Queue(job.queue, connection=self.redis).enqueue(
                    job.func, args=job.args, job_timeout=job.timeout, ttl=job.ttl, description=f"clock: {job.name}"
                )
                job.advance(now)


# --- the session ----------------------------------------------------------------------


def busy(svc: Services, worker: InlineWorker) -> bool:
    return bool(svc.runs.live()) or not worker.idle() or bool(worker.scheduled())


def wait_idle(svc: Services, worker: InlineWorker, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.idle() and not svc.runs.live() and not worker.scheduled():
            time.sleep(0.3)
            if worker.idle() and not worker.scheduled():
                return
        time.sleep(0.2)


@dataclass(frozen=True)
class Code:
    """What the console trains: a repository and the ref runs use when none is typed."""

    repo: Path
    ref: str
    generated: bool  # the example repository the console made


def banner(seeded: SeedInfo, code: Code, clock: Clock, launch_file: Path | None) -> str:
    rows = "\n".join(f"    {name:<12} {iid}" for name, iid in seeded.instances.items())
    if code.generated:
        scripts = "\n".join(f"    {name:<26} {what}" for name, what in EXAMPLE_SCRIPTS)
        trains = (
            f"Training code: the example repository the console made, {code.repo} (ref `{code.ref}`).\n"
            f"Its scripts:\n{scripts}\n"
            "Your own code: --repo PATH (or RUNCTL_REPO=PATH), a git repository; --ref REF picks the ref.\n"
        )
    else:
        trains = (
            f"Training code: your repository {code.repo}, ref `{code.ref}` "
            "(committed code only: a run gets the ref's `git archive`).\n"
        )
    if clock.factor > 1:
        timing = (
            f"Clock: the sweep (warnings, autostop), the reconcile, the monitor and the digest run as the clock "
            f"process schedules them, with time {clock.factor:g}x as fast while nothing trains (--fast).\n"
        )
    else:
        timing = (
            "Clock: the sweep (warnings, autostop), the reconcile, the monitor and the digest run on the clock "
            "process's schedule, in real time; --fast compresses idle time.\n"
        )
    launch = f"Launch file: {launch_file} (`/runctl launch gpu`, `/runctl launch cpu`).\n" if launch_file else ""
    return (
        "runctl console: the bot, a sandboxed AWS and a fake Slack, all on this machine.\n"
        f"Instances:\n{rows}\n"
        + trains
        + timing
        + launch
        + f"A stop gives a script {STOP_GRACE_SECONDS} s to save (a deployment's default is 120 s).\n"
        "Try:\n"
        "    /runctl train gpu-box-1 train_with_checkpoints.py -- --epochs 5\n"
        "    /runctl status gpu-box-1\n"
        "    /runctl help\n"
        "An instance is named by its name or its id (`$gpu-box-1` also stands for the id).\n"
        "A number clicks that button; /wait waits for running work (Ctrl-C stops waiting);\n"
        "/quit or Ctrl-C leaves; the up arrow recalls a command."
    )


def resolve_code(repo: str | None, ref: str | None, workdir: Path) -> Code:
    """--repo, else RUNCTL_REPO, else the example repository; --ref, else RUNCTL_REF, else the
    repository's current branch."""
    chosen = repo or os.environ.get("RUNCTL_REPO") or None
    if chosen is None:
        return Code(make_example_repo(workdir / "training-code"), ref or "main", True)
    path = Path(chosen).expanduser().resolve()
    head = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        raise SystemExit(f"runctl console: {path} is not a git repository: {head.stderr.strip()}")
    current = head.stdout.strip()
    return Code(path, ref or os.environ.get("RUNCTL_REF") or (current if current != "HEAD" else "main"), False)


def write_launch_file(made: LaunchSeed, path: Path) -> Path:
    """The sandbox's own launch file: its AMI, default subnets, a security group and an
    instance profile whose role has AmazonSSMManagedInstanceCore."""
    subnets = ", ".join(f'"{s}"' for s in made.subnets[:2])
    path.write_text(
        "# The console's launch file: the sandbox's network and instance profile (see docs/lifecycle.md)\n"
        "[template]\n"
        f'ami = "{made.ami}"\n'
        f"subnets = [{subnets}]\n"
        f'security_groups = ["{made.security_group}"]\n'
        f'instance_profile = "{made.instance_profile}"\n'
        "disk_gb = 50\n"
        "[presets.gpu]\n"
        'instance_type = "g5.xlarge"\n'
        "[presets.cpu]\n"
        'instance_type = "t3.medium"\n'
        "[limits]\n"
        "user_instances = 2\n"
        "user_usd_per_hour = 5\n"
        "team_instances = 6\n"
        "team_usd_per_hour = 20\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    """0 on /quit or the end of input; 130 (128 + SIGINT) when Ctrl-C at the prompt leaves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the sandbox keeps its files (kept)")
    parser.add_argument(
        "--repo",
        default=None,
        help="the git repository to train from (default: $RUNCTL_REPO, else an example repository the console makes)",
    )
    parser.add_argument("--ref", default=None, help="the ref runs use (default: $RUNCTL_REF, else the repo's branch)")
    parser.add_argument(
        "--fast",
        nargs="?",
        type=float,
        const=FAST_FACTOR,
        default=1.0,
        metavar="FACTOR",
        help=f"run the clock FACTOR times as fast while nothing trains (default {FAST_FACTOR:g}: "
        "a warning and an autostop within a minute of idling)",
    )
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1` prints every thread's stack: a console that hangs says where
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    temporary = args.workdir is None  # removed on exit; a --workdir is kept for inspection
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runctl-console-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    console = Console(out, files=workdir / "slack-files")
    prompt = Prompt(sys.stdin, console)
    status = 0
    try:
        code = resolve_code(args.repo, args.ref, workdir)
        status = session(console, prompt, workdir, code, Clock(args.fast))
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.say(f"Sandbox files (instances' remote roots) are in {workdir}")
    return status


def session(console: Console, prompt: Prompt, workdir: Path, code: Code, clock: Clock) -> int:
    sandbox = Sandbox(workdir / "aws")
    sandbox.ec2.clock = clock.now
    sandbox.start()
    os.environ.update(sandbox.env())
    slack = FakeSlack(member_of=[CHANNEL])
    worker: InlineWorker | None = None
    ticker: ClockThread | None = None
    try:
        seeded = seed(sandbox.endpoint_url, "us-east-1", "runctl-console-bundles")
        launch_file = write_launch_file(seed_launch(sandbox.endpoint_url, "us-east-1"), workdir / "launch.toml")
        slack.start()
        slack.on_event(console.show)
        settings = Settings(
            SLACK_BOT_TOKEN=TOKEN,
            SLACK_SIGNING_SECRET=SECRET,
            SLACK_API_URL=slack.base_url,
            RUNCTL_REPO=str(code.repo),
            RUNCTL_REF=code.ref,
            RUNCTL_S3_BUCKET="runctl-console-bundles",
            RUNCTL_MIRROR_DIR=workdir / "mirror",
            RUNCTL_CHANNEL=CHANNEL,
            RUNCTL_ADMINS=[USER],
            RUNCTL_POLL_MIN_SECONDS=1,
            RUNCTL_POLL_MAX_SECONDS=3,
            RUNCTL_LAUNCH_CHECK_SECONDS=1,
            RUNCTL_LAUNCH_FILE=launch_file,
            RUNCTL_LAUNCH_POLL_SECONDS=1,
            RUNCTL_STOP_GRACE_SECONDS=STOP_GRACE_SECONDS,
        )
        # The clock's schedule (workers/cron.py reads its settings from the environment) as the console's.
        os.environ["RUNCTL_POLL_MAX_SECONDS"] = str(settings.RUNCTL_POLL_MAX_SECONDS)
        redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        client = WebClient(token=TOKEN, base_url=slack.base_url)
        svc = Services(settings=settings, redis=redis, notifier=Notifier(client), clock=clock.now)
        services.install(svc)
        app = build_app(settings, redis, client=client)
        worker = InlineWorker(redis)
        worker.start()
        ticker = ClockThread(clock, svc, redis)
        ticker.start()
        console.say(banner(seeded, code, clock, launch_file))
        return converse(console, prompt, app, svc, worker, seeded)
    finally:
        if ticker is not None:
            ticker.stop()
        if worker is not None:
            for queue in worker.queues:  # leaving: what is queued (clock jobs, ticks) goes with the sandbox
                queue.empty()  # type: ignore[no-untyped-call]
            worker.stop()
        slack.stop()
        sandbox.stop()
        services.install(None)


def converse(console: Console, prompt: Prompt, app: App, svc: Services, worker: InlineWorker, seeded: SeedInfo) -> int:
    """The read-answer loop. Ctrl-C during /wait stops waiting (the work goes on); at the
    prompt it leaves, with 130."""
    try:
        while True:
            raw = prompt.read()
            if raw is None:  # the end of input: a piped script's work is waited for
                if not prompt.tty:
                    wait_idle(svc, worker)
                return 0
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not prompt.tty:
                console.say(f"> {line}")  # a terminal echoed it already
            if line in ("/quit", "/exit"):
                return 0
            if line == "/wait":
                if not busy(svc, worker):
                    console.say("Nothing is running or queued: nothing to wait for.")
                    continue
                try:
                    wait_idle(svc, worker)
                except KeyboardInterrupt:
                    console.say("\nStopped waiting (the work goes on). /wait again, or Ctrl-C or /quit to leave.")
            elif line.isdigit():
                console.click(app, int(line), prompt.read)
            elif line.startswith("/runctl"):
                for name, iid in seeded.instances.items():
                    line = line.replace(f"${name}", iid)
                console.command(app, line.removeprefix("/runctl").strip())
            else:
                console.say("Type `/runctl ...`, a button number, /wait or /quit.")
    except KeyboardInterrupt:
        console.say("")
        return 130


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Everything is cleaned up by now; don't wait on a sandbox agent's or a retry's stray thread.
    os._exit(code)
