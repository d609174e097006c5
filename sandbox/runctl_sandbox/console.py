"""The console demo: the whole bot on this machine, no Slack, AWS or Redis server.

fakeredis in-process, the AWS sandbox (moto + the executing-SSM shim), a fake
Slack Web API and an in-process worker. Each typed `/runctl ...` line goes through
the same Bolt app (`app.dispatch`) with a signed request; posted messages print as
text, and a button is clicked by typing its number (Errbot's text backend and
Hubot's shell adapter work the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import fakeredis
from slack_bolt import App
from slack_bolt.request import BoltRequest
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier

from bot.app import build_app
from runctl_sandbox.aws import Sandbox, SeedInfo, seed
from runctl_sandbox.example_repo import make_example_repo
from runctl_sandbox.fake_slack import FakeSlack, Message
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


def sign(body: str) -> dict[str, str | Sequence[str]]:
    ts = str(int(time.time()))
    return {
        "content-type": "application/x-www-form-urlencoded",
        "x-slack-request-timestamp": ts,
        "x-slack-signature": SignatureVerifier(SECRET).generate_signature(timestamp=ts, body=body) or "",
    }


def plain(text: str) -> str:
    text = _MENTION.sub(lambda m: "@" + m.group(1).lower().removeprefix("u0"), text)
    return _DATE.sub(lambda m: m.group(1), text)


class Console:
    def __init__(self, out: TextIO, user: str = USER) -> None:
        self.out = out
        self.user = user
        self.buttons: list[tuple[Message, dict[str, Any], dict[str, Any]]] = []
        self.lock = threading.Lock()

    # --- rendering ------------------------------------------------------------
    def show(self, kind: str, msg: Any) -> None:
        if not isinstance(msg, Message):
            if kind == "file":
                self.say(f"  [file] {getattr(msg, 'filename', '?')}: {getattr(msg, 'title', '')}")
            return
        if kind == "delete":
            return
        private = msg.ephemeral or kind == "response_url"
        where = "only you" if private else ("thread" if msg.thread_ts else f"#{msg.channel}")
        tag = {"post": "", "update": " (updated)", "ephemeral": "", "response_url": ""}.get(kind, "")
        lines = self.render(msg)
        with self.lock:
            self.say(f"[{where}{tag}] " + (lines[0] if lines else ""))
            for line in lines[1:]:
                self.say("    " + line)

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
                        self.buttons.append((msg, block, element))
                        labels.append(f"[{len(self.buttons)}] {element['text']['text']}")
                lines.append("  ".join(labels) + "   (type the number to click)")
            elif kind == "divider":
                lines.append("-" * 20)
        return lines

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

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
                "text": text,
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

    def __init__(self, stdin: TextIO) -> None:
        self.stdin = stdin
        self.tty = stdin.isatty()
        if self.tty:
            import readline  # noqa: F401  (imported for its effect: input() edits and keeps history)

    def read(self, prompt: str = "runctl> ") -> str | None:
        """The next line, None at the end of input; Ctrl-C raises KeyboardInterrupt."""
        if self.tty:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        return None if line == "" else line


def wait_idle(svc: Services, worker: InlineWorker, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.idle() and not svc.runs.live() and not worker.scheduled():
            time.sleep(0.3)
            if worker.idle() and not worker.scheduled():
                return
        time.sleep(0.2)


def banner(seeded: SeedInfo) -> str:
    rows = "\n".join(f"    {name:<12} {iid}" for name, iid in seeded.instances.items())
    return (
        "runctl console: the bot, a sandboxed AWS and a fake Slack, all on this machine.\n"
        f"Instances:\n{rows}\n"
        "Try:\n"
        "    /runctl train gpu-box-1 train_with_checkpoints.py -- --epochs 5\n"
        "    /runctl status gpu-box-1\n"
        "    /runctl help\n"
        "An instance is named by its name or its id (`$gpu-box-1` also stands for the id).\n"
        "A number clicks that button; /wait waits for running work (Ctrl-C stops waiting);\n"
        "/quit or Ctrl-C leaves; the up arrow recalls a command."
    )


def main(argv: list[str] | None = None) -> int:
    """0 on /quit or the end of input; 130 (128 + SIGINT) when Ctrl-C at the prompt leaves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=None, help="where the sandbox keeps its files (kept)")
    args = parser.parse_args(argv)
    temporary = args.workdir is None  # removed on exit; a --workdir is kept for inspection
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="runctl-console-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    console = Console(out)
    prompt = Prompt(sys.stdin)
    status = 0
    try:
        status = session(console, prompt, workdir)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.say(f"Sandbox files (instances' remote roots) are in {workdir}")
    return status


def session(console: Console, prompt: Prompt, workdir: Path) -> int:
    sandbox = Sandbox(workdir / "aws")
    sandbox.start()
    os.environ.update(sandbox.env())
    slack = FakeSlack(member_of=[CHANNEL])
    worker: InlineWorker | None = None
    try:
        seeded = seed(sandbox.endpoint_url, "us-east-1", "runctl-console-bundles")
        repo = make_example_repo(workdir / "training-code")
        slack.start()
        slack.on_event(console.show)
        settings = Settings(
            SLACK_BOT_TOKEN=TOKEN,
            SLACK_SIGNING_SECRET=SECRET,
            SLACK_API_URL=slack.base_url,
            RUNCTL_REPO=str(repo),
            RUNCTL_S3_BUCKET="runctl-console-bundles",
            RUNCTL_MIRROR_DIR=workdir / "mirror",
            RUNCTL_CHANNEL=CHANNEL,
            RUNCTL_ADMINS=[USER],
            RUNCTL_POLL_MIN_SECONDS=1,
            RUNCTL_POLL_MAX_SECONDS=3,
            RUNCTL_LAUNCH_CHECK_SECONDS=1,
            RUNCTL_STOP_GRACE_SECONDS=30,
        )
        redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        client = WebClient(token=TOKEN, base_url=slack.base_url)
        svc = Services(settings=settings, redis=redis, notifier=Notifier(client))
        services.install(svc)
        app = build_app(settings, redis, client=client)
        worker = InlineWorker(redis)
        worker.start()
        console.say(banner(seeded))
        return converse(console, prompt, app, svc, worker, seeded)
    finally:
        if worker is not None:
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
