"""Hostile args reach the training program exactly as typed: nothing a user writes
is ever interpreted by the shell on the instance."""

from __future__ import annotations

import ast
import json
import os
import select
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.grammar import parse
from workers.commands import TrainCommand
from workers.remote import header, launch_body, wrapper

HOSTILE = [
    "$(touch pwned)", "`touch pwned`", "; touch pwned", "' ; touch pwned '", '"$(touch pwned)"',
    "&& touch pwned", "| touch pwned", "$HOME", "${IFS}", "*", "~", "!", "#", "\\", "\\'", "'\"'\"'",
    "", " ", "-u", "--", "--lr=0.1", "%s%n", "\u2028", "é", "日本語", "🙂", "a\u00a0b", ">pwned", "<in",
]
# Any unicode but control characters (refused upfront by the grammar) and lone surrogates.
ARG = st.one_of(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
    st.sampled_from(HOSTILE),
    st.lists(st.sampled_from(HOSTILE), min_size=2, max_size=4).map("".join),
)
SMART_QUOTES = "“”‘’"  # the grammar reads these as ASCII quotes (Slack's autocorrect)


class Shell:
    """One long-lived `sh` (dash) that runs each script in a subshell: the script
    text runs exactly as sent, without paying a process start per example."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def run(self, script: str, timeout: float = 10.0) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        marker = f"__done_{uuid.uuid4().hex}"
        self.proc.stdin.write(f"(\n{script}\n)\necho {marker} $?\n".encode())
        self.proc.stdin.flush()
        output: list[str] = []
        fd = self.proc.stdout.fileno()
        buffer = b""
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise AssertionError("the script did not finish (broken quoting?):\n" + script)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("sh exited:\n" + buffer.decode(errors="replace"))
            buffer += chunk
            text = buffer.decode(errors="replace")
            if marker in text:
                before, _, after = text.partition(marker)
                output.append(before)
                return int(after.split()[0]), "".join(output)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shell() -> Iterator[Shell]:
    sh = Shell()
    yield sh
    sh.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("remote")
    (base / "code").mkdir()
    return base


def stub(root: Path, name: str, body: str) -> str:
    path = root / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


# A stub interpreter that prints its argv as a JSON array. In C, because 2000 examples
# in CI cannot afford a Python start-up (~30 ms) each; UTF-8 passes through unchanged.
ARGV_JSON_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    putchar('[');
    for (int i = 1; i < argc; i++) {
        if (i > 1) putchar(',');
        putchar('"');
        for (unsigned char *c = (unsigned char *)argv[i]; *c; c++) {
            if (*c == '"' || *c == '\\') { putchar('\\'); putchar(*c); }
            else if (*c < 0x20) printf("\\u%04x", *c);
            else putchar(*c);
        }
        putchar('"');
    }
    puts("]");
    return 0;
}
"""


@pytest.fixture(scope="module")
def fast_json_stub(root: Path, json_stub: str) -> str:
    source = root / "argv_json.c"
    source.write_text(ARGV_JSON_C)
    binary = root / "argv-json-c"
    try:
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return json_stub  # no C compiler: slower, same output
    return str(binary)


@pytest.fixture(scope="module")
def json_stub(root: Path) -> str:
    return stub(root, "argv-json", "#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")


def run_wrapper(shell: Shell, root: Path, python: str, script: str, args: list[str], env: dict[str, str]) -> Path:
    run_dir = root / "runs" / "r-quoting"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("training.log", "exit_code", "pid", "pgid"):
        (run_dir / name).unlink(missing_ok=True)
    rc, out = shell.run(header(str(root)) + wrapper(run_dir.name, script, args, env, python=python))
    assert rc == 0, out
    return run_dir


def pwned(root: Path) -> list[Path]:
    """Files a successful injection would have created (the wrapper runs in $RUNCTL_ROOT/code)."""
    return [p for d in (root, root / "code") for p in d.glob("pwned*")]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(ARG, max_size=8), script=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20))
@example(args=HOSTILE, script="train; touch pwned.py")
def test_any_args_reach_the_program_verbatim(
    shell: Shell, root: Path, fast_json_stub: str, args: list[str], script: str
) -> None:
    run_dir = run_wrapper(shell, root, fast_json_stub, script, args, {})
    received = json.loads((run_dir / "training.log").read_bytes().decode())
    assert received == ["-u", script, *args]
    assert (run_dir / "exit_code").read_text().strip() == "0"
    assert not pwned(root)


def test_json_stub_through_the_full_launch_script(shell: Shell, root: Path, json_stub: str) -> None:
    """The detached launch (heredoc into run.sh, setsid) hands over the same list, env values too."""
    run_id = "r-launch-quoting"
    args = [*HOSTILE, "RUNCTL_EOF_0", "EOF"]
    env = {"RUNCTL_RUN_ID": run_id, "EXTRA": "$(touch pwned) `touch pwned` '\""}
    meta = json.dumps({"script": "$(touch pwned)"})
    rc, out = shell.run(header(str(root)) + launch_body(run_id, "a b.py", args, env, meta, python=json_stub))
    assert rc == 0 and "launched" in out
    exit_code = root / "runs" / run_id / "exit_code"
    for _ in range(200):
        if exit_code.exists():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    log = (root / "runs" / run_id / "training.log").read_text()
    assert json.loads(log.splitlines()[0]) == ["-u", "a b.py", *args]
    assert json.loads((root / "runs" / run_id / "meta.json").read_text()) == {"script": "$(touch pwned)"}
    assert not pwned(root)


@settings(max_examples=500, deadline=None)
@given(args=st.lists(ARG.filter(lambda a: not set(a) & set(SMART_QUOTES)), max_size=8))
def test_the_grammar_hands_args_over_unchanged(args: list[str]) -> None:
    """What a user types after `--`, quoted as a shell would, is what the run gets."""
    text = "train i-0123456789abcdef0 train.py -- " + shlex.join(args)
    command = parse(text)
    assert isinstance(command, TrainCommand)
    assert list(command.args) == args


# --- the rule, checked on the source: a quoted word is never inside another quoting context ---

QUOTERS = {"q", "quote", "interpreter", "run_dir"}  # each returns shell words already quoted


def _quoter(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        return name if name in QUOTERS else None
    return None


def shell_state(text: str, state: str = "") -> str:
    """The quoting context ("", "'" or '"') at the end of `text`, read as sh would."""
    i = 0
    while i < len(text):
        ch = text[i]
        if state == "'":
            state = "" if ch == "'" else state
        elif ch == "\\":
            i += 1
        elif state == '"':
            state = "" if ch == '"' else state
        elif ch in "'\"":
            state = ch
        i += 1
    return state


def nested_quotes(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.JoinedStr):
            continue
        state = ""
        for part in node.values:
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                state = shell_state(part.value, state)
            elif isinstance(part, ast.FormattedValue) and (name := _quoter(part.value)) and state:
                found.append(f"line {node.lineno}: {name}(...) inside {state}")
    return found


def test_the_nesting_check_catches_the_old_pattern() -> None:
    assert nested_quotes('f"  echo \\"runctl: script {q(script)} is missing\\" >&2"')
    assert nested_quotes("f\"echo 'x {shlex.quote(v)}'\"")
    assert not nested_quotes("f'SCRIPT={q(script)}\\nprintf \"%s\" \"$SCRIPT\"'")
    assert not nested_quotes("f'\"$RUNCTL_ROOT/runs/\"{q(run_id)}'")


def test_no_builder_puts_a_quoted_value_inside_another_quoting_context() -> None:
    problems = {
        str(path): found
        for path in sorted(Path("workers").rglob("*.py"))
        if (found := nested_quotes(path.read_text()))
    }
    assert problems == {}
