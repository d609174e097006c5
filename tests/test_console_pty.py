"""The console as a person types into it, through a pseudo-terminal (stdlib `pty`): a
prompt, readline history (the up arrow), Ctrl-C stops a /wait and returns to the prompt,
Ctrl-C at the prompt leaves with 130, and the temporary folder is gone afterwards."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "runctl> "


class Terminal:
    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the console, with the pty as its controlling terminal
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "runctl_sandbox.console", *(args or [])], env)
        self.seen = ""

    def drain(self) -> None:
        """Read what the console printed so far, without waiting."""
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.seen += chunk.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 120, after: int = 0) -> int:
        """Read until `pattern` (a regex) appears past offset `after`; returns the offset past it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.seen, after)
            if found:
                return found.end()
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {pattern!r} within {timeout} s; the screen ends:\n{self.seen[-3000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    pytest.fail(f"the console ended before {pattern!r}:\n{self.seen[-3000:]}")
                self.seen += chunk.decode(errors="replace")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_status(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain what it still prints; read only what is there (a live, quiet child would block)
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.seen += os.read(self.fd, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGUSR1)  # the console's faulthandler prints every thread's stack
        time.sleep(1)
        self.drain()
        os.kill(self.pid, signal.SIGKILL)
        pytest.fail(f"the console did not leave within {timeout} s; the screen ends:\n{self.seen[-6000:]}")


def test_history_ctrl_c_during_wait_and_the_exit_status(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TERM": "xterm",
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sandbox")]),
    }
    term = Terminal(env)
    at = term.expect(re.escape(PROMPT))

    term.type("/runctl help status\r")
    help_line = re.escape("the instance's id, or its name")
    at = term.expect(help_line, 30, at)
    at = term.expect(re.escape(PROMPT), 30, at)
    term.type("\x1b[A\r")  # the up arrow recalls the last command
    at = term.expect(help_line, 30, at)
    at = term.expect(re.escape(PROMPT), 30, at)
    assert term.seen.count("`/runctl status <instance-id>`") == 2
    assert not re.search(r"^> /runctl", term.seen, re.M)  # the terminal echoed it; the console does not again
    assert "response_url" not in term.seen  # no log noise between the answers

    term.type(
        "/runctl train gpu-box-1 train_with_checkpoints.py -- --epochs 3 --steps-per-epoch 4 --step-seconds 0.25\r"
    )
    at = term.expect("Queued run", 30, at)
    term.type("/wait\r")
    at = term.expect(re.escape("*Running*"), 60, at)
    term.type("\x03")  # Ctrl-C while waiting: back to the prompt, the run goes on
    at = term.expect("Stopped waiting", 30, at)
    at = term.expect(re.escape(PROMPT), 30, at)

    term.type("/wait\r")  # the run finishes
    at = term.expect(r"finished \(exit 0\)", 90, at)
    at = term.expect(re.escape(PROMPT), 60, at)
    term.type("\x03")  # Ctrl-C at the prompt leaves
    assert term.exit_status() == 130
    assert list(tmp_path.glob("runctl-console-*")) == []  # its temporary folder is removed


def test_a_button_with_a_confirmation_asks_as_slack_does() -> None:
    import io

    from slack_bolt import App

    from runctl_sandbox.console import Console
    from runctl_sandbox.fake_slack import Message

    out = io.StringIO()
    console = Console(out)
    confirm = {
        "title": {"type": "plain_text", "text": "Terminate for good?"},
        "text": {"type": "plain_text", "text": "gpu-box-1 and its root volume will be deleted."},
        "confirm": {"type": "plain_text", "text": "Terminate"},
        "deny": {"type": "plain_text", "text": "Keep it"},
    }
    button = {
        "type": "button",
        "action_id": "terminate_confirm",
        "text": {"type": "plain_text", "text": "Terminate"},
        "confirm": confirm,
    }
    console.render(Message("C0CONSOLE", "1.0", "", [{"type": "actions", "elements": [button]}]))
    asked: list[str] = []

    def ask(question: str) -> str:
        asked.append(question)
        return ""  # Enter

    app = App(token="xoxb-unused", signing_secret="unused", token_verification_enabled=False)  # never reached
    console.click(app, 1, ask)
    shown = out.getvalue()
    assert "[confirm] Terminate for good?" in shown and "root volume will be deleted" in shown
    assert asked == ["Terminate? [y/N] (Keep it: Enter) "] and "Not clicked." in shown
