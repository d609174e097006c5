"""Issue 31, a newcomer's first day in the console, through a pseudo-terminal: their own
repository, the clock's jobs with compressed time, and a screen that stays readable while
updates arrive."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from .test_console_pty import PROMPT, ROOT, Terminal

pytestmark = pytest.mark.slow


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TERM": "xterm",
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sandbox")]),
    }


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: carriage returns, backspaces, erase-line and
    cursor moves applied; other escape sequences dropped."""
    lines: list[list[str]] = [[]]
    col = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            found = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])", raw[i:])
            if found:
                arg, op = found.group(1), found.group(2)
                n = int(arg) if arg.isdigit() else 1
                line = lines[-1]
                if op == "K":
                    del line[col:]
                elif op == "C":
                    col += n
                elif op == "D":
                    col = max(0, col - n)
                i += found.end()
                continue
            i += 2
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        elif ch == "\b":
            col = max(0, col - 1)
        elif ch >= " ":
            line = lines[-1]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in lines]


def make_repo(path: Path) -> Path:
    path.mkdir()
    (path / "mine.py").write_text("print('hello from my own repository', flush=True)\n")

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-C", str(path), "-c", "user.name=me", "-c", "user.email=me@example.invalid", *args],
            check=True,
            capture_output=True,
        )

    git("init", "-q", "-b", "work")
    git("add", "-A")
    git("commit", "-q", "-m", "my code")
    return path


def test_the_console_trains_the_repository_it_is_given(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "my-code")
    term = Terminal(env_for(tmp_path), ["--repo", str(repo)])
    at = term.expect(re.escape(PROMPT))
    assert f"Training code: your repository {repo}, ref `work`" in term.seen

    term.type("/runctl train gpu-box-1 mine.py\r")
    at = term.expect(r"finished \(exit 0\)", 120, at)
    found = re.findall(r"\[(\d+)\] Full log", term.seen[at - 400 :])
    term.type(f"{found[-1]}\r")
    at = term.expect(r"\| hello from my own repository", 60, at)
    assert "[file] " in term.seen and "saved as " in term.seen
    term.type("/quit\r")
    assert term.exit_status() == 0


def test_with_fast_time_an_idle_instance_is_warned_and_autostopped_within_a_minute(tmp_path: Path) -> None:
    term = Terminal(env_for(tmp_path), ["--fast", "1800"])
    at = term.expect(re.escape(PROMPT))
    assert "1800x as fast while nothing trains (--fast)" in term.seen
    started = time.monotonic()
    term.type("/runctl autostop cpu-box 5\r")
    heads_up = term.expect(r"Heads-up: \*cpu-box .*Autostop stops it in", 60, at)
    term.expect(r"Autostop stopped \*cpu-box", 60, heads_up)
    term.expect(r"has been running for 1d 0h in total, over the 24 h limit[^\[]*\[\d+\] Stop now", 60, at)
    assert time.monotonic() - started < 60
    term.type("/quit\r")
    assert term.exit_status() == 0


def test_updates_leave_a_half_typed_command_intact(tmp_path: Path) -> None:
    term = Terminal(env_for(tmp_path))
    at = term.expect(re.escape(PROMPT))
    term.type(
        "/runctl train gpu-box-1 train_with_checkpoints.py -- --epochs 30 --steps-per-epoch 4 --step-seconds 0.1\r"
    )
    at = term.expect(r"\*Running\*", 60, at)
    typed = "/runctl status gpu-box-2"
    before = term.seen.count("(updated)")
    for key in typed:  # slowly, as updates arrive
        term.type(key)
        time.sleep(0.35)
        term.drain()
    assert term.seen.count("(updated)") > before, "no update arrived while typing"
    shown = screen(term.seen)
    assert shown[-1] == PROMPT + typed  # the prompt and the whole half-typed line, drawn again below
    assert not any(line.startswith("[") and typed[3:12] in line for line in shown)  # no update glued to it
    term.type("\r")
    term.expect(r"\*gpu-box-2 \(i-[0-9a-f]+\)\* · p3\.2xlarge", 60, at)
    term.type("/quit\r")
    assert term.exit_status() == 0
