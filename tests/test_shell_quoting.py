"""Hostile values reach the instance exactly as typed: nothing a user, the training repo or
the instance itself writes is ever interpreted by the shell there (dash, as SSM runs it)."""

from __future__ import annotations

import ast
import json
import os
import select
import shlex
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.grammar import parse
from workers.commands import TrainCommand
from workers.remote import deliver, header, launch_body, probe_live_runs, runs_status, wrapper
from workers.remote.checkpoints import list_all_checkpoints, list_checkpoints
from workers.remote.env import setup_env
from workers.remote.gpu import utilization
from workers.remote.lifecycle import stop_run

HOSTILE = [
    "$(touch pwned)",
    "`touch pwned`",
    "; touch pwned",
    "' ; touch pwned '",
    '"$(touch pwned)"',
    "&& touch pwned",
    "| touch pwned",
    "$HOME",
    "${IFS}",
    "*",
    "~",
    "!",
    "#",
    "\\",
    "\\'",
    "'\"'\"'",
    "",
    " ",
    "-u",
    "--",
    "--lr=0.1",
    "%s%n",
    "\u2028",
    "é",
    "日本語",
    "🙂",
    "a\u00a0b",
    ">pwned",
    "<in",
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

    def __init__(self, cwd: Path | None = None) -> None:
        dash = shutil.which("dash")
        if dash is None:
            pytest.fail("dash is not installed (`apt-get install dash`); instance scripts must run under it")
        self.proc = subprocess.Popen(
            [dash], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd
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
    (run_dir / "work").mkdir(parents=True, exist_ok=True)  # launch_body copies the tree there
    for name in ("training.log", "exit_code", "pid", "pgid"):
        (run_dir / name).unlink(missing_ok=True)
    rc, out = shell.run(header(str(root)) + wrapper(run_dir.name, script, args, env, python=python))
    assert rc == 0, out
    return run_dir


def pwned(root: Path) -> list[Path]:
    """Files a successful injection would have created (the wrapper runs in the run's work/)."""
    return [p for d in (root, root / "code", root / "runs" / "r-quoting" / "work") for p in d.glob("pwned*")]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    args=st.lists(ARG, max_size=8),
    script=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20),
)
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
    """What a user types after `--`, quoted as a shell would, is what the run gets, after
    Slack has HTML-escaped `&`, `<` and `>` in the command text as it sends it."""
    typed = "train i-0123456789abcdef0 train.py -- " + shlex.join(args)
    command = parse(typed.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
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
    call = "{" + "q(script)}"  # spelled in two pieces so this file passes the same check
    assert nested_quotes('f"  echo \\"runctl: script ' + call + ' is missing\\" >&2"')
    assert nested_quotes("f\"echo 'x {" + "shlex.quote(v)}'\"")
    assert not nested_quotes("f'SCRIPT=" + call + '\\nprintf "%s" "$SCRIPT"\'')
    assert not nested_quotes('f\'"$RUNCTL_ROOT/runs/"{' + "q(run_id)}'")


def test_no_builder_puts_a_quoted_value_inside_another_quoting_context() -> None:
    problems = {
        str(path): found for path in sorted(Path("workers").rglob("*.py")) if (found := nested_quotes(path.read_text()))
    }
    assert problems == {}


# --- every builder input, through the real built scripts under dash ---------------------

MARK = "MARKER"
INJECTIONS = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"; touch {MARK}",
    f"\ntouch {MARK}\n",
    f"' ; touch {MARK} ; '",
    f'" ; touch {MARK} ; "',
    f'"$(touch {MARK})"',
    f"'$(touch {MARK})'",
    f"&& touch {MARK}",
    f"| touch {MARK}",
    f"$(touch {MARK}).py",
    f"\\$(touch {MARK})",
    f"${{x:-$(touch {MARK})}}",
    f"\nRUNCTL_EOF_0\ntouch {MARK}\n",
]
ANY = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=30)
VALUE = st.one_of(
    st.sampled_from(INJECTIONS),
    st.tuples(ANY, st.sampled_from(INJECTIONS), ANY).map("".join),
    st.lists(st.sampled_from(INJECTIONS + HOSTILE), min_size=1, max_size=4).map("".join),
)


def _name(text: str) -> str:
    """One path component that stays where it is put (no `/`, not `.` or `..`)."""
    text = text.replace("/", "_")[:60]
    return "x" if text in ("", ".", "..") else text


NAME = VALUE.map(_name)


def _stubs(base: Path, argv_json: str) -> Path:
    """A PATH with fake tools, so the environment and download steps run to the end in
    milliseconds: `uv` prints its argv as JSON, `curl` copies a prepared bundle."""
    bin_dir = base / "bin"
    bin_dir.mkdir()
    shutil.copy(argv_json, bin_dir / "uv")
    stub(
        bin_dir,
        "python3",
        '#!/bin/sh\ncase "$1" in\n  -c) echo 3.11 ;;\n  -m) for last; do :; done; mkdir -p "$last/bin" ;;\nesac\n',
    )
    bundle = base / "bundle.tar.gz"
    (base / "train.py").write_text("print('hi')\n")
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(base / "train.py", arcname="train.py")
    stub(
        bin_dir,
        "curl",
        f'#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\ncp {shlex.quote(str(bundle))} "$out"\n',
    )
    return bin_dir


@pytest.fixture(scope="module")
def playground(
    tmp_path_factory: pytest.TempPathFactory, fast_json_stub: str
) -> Iterator[tuple[Shell, Path, Path, str]]:
    base = tmp_path_factory.mktemp("hostile")
    bin_dir = _stubs(base, fast_json_stub)
    shell = Shell(cwd=base)
    yield shell, base, bin_dir, fast_json_stub
    shell.close()


def markers(base: Path) -> list[Path]:
    return [p for p in base.rglob("*") if p.name.startswith(MARK)]


def _wait_for(path: Path, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


# 40 examples of 13 hostile values each, every builder run for real: about 15 s.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    root_name=NAME,
    run_id=NAME,
    resumed=NAME,
    script=VALUE,
    args=st.lists(VALUE, max_size=3),
    env_value=VALUE,
    ref=VALUE,
    url=VALUE,
    digest=NAME,
    workdir=NAME,
    requirements=VALUE,
    generated=st.none() | VALUE,
    checkpoint=NAME,
    python_dir=NAME,
)
@example(
    root_name="$(touch MARKER)",
    run_id="$(touch MARKER)",
    resumed="`touch MARKER`",
    script="$(id > MARKER).py",
    args=["; touch MARKER"],
    env_value="$(touch MARKER)",
    ref="main;touch MARKER",
    url="http://x/$(touch MARKER)",
    digest="$(touch MARKER)",
    workdir="$(touch MARKER)",
    requirements="$(touch MARKER).txt",
    generated="RUNCTL_EOF_0\n$(touch MARKER)",
    checkpoint="$(touch MARKER).pt",
    python_dir="$(touch MARKER)",
)
def test_no_value_reaching_any_builder_is_ever_executed(
    playground: tuple[Shell, Path, Path, str],
    root_name: str,
    run_id: str,
    resumed: str,
    script: str,
    args: list[str],
    env_value: str,
    ref: str,
    url: str,
    digest: str,
    workdir: str,
    requirements: str,
    generated: str | None,
    checkpoint: str,
    python_dir: str,
) -> None:
    shell, base, bin_dir, argv_json = playground
    # The interpreters (an instance tag or RUNCTL_PYTHON names them) live under a hostile path too.
    interpreters = base / "py" / python_dir
    shutil.rmtree(base / "py", ignore_errors=True)
    interpreters.mkdir(parents=True)
    python = str(shutil.copy(bin_dir / "python3", interpreters / "python3"))
    argv_json = str(shutil.copy(argv_json, interpreters / "argv-json"))
    if resumed == run_id:
        resumed += "-0"
    root = base / "roots" / root_name
    shutil.rmtree(base / "roots", ignore_errors=True)
    for name in (run_id, resumed):
        (root / "runs" / name / "checkpoints").mkdir(parents=True)
    # Instance-side names are as hostile as user input: a checkpoint file and its manifest entry.
    ck = root / "runs" / resumed / "checkpoints"
    (ck / checkpoint).write_bytes(b"w")
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"file": checkpoint, "epoch": 1, "size": 1}]}))
    path = f"PATH={shlex.quote(str(bin_dir))}:$PATH\nexport PATH\n"

    def run(script_text: str) -> tuple[int, str]:
        return shell.run(path + script_text)

    # The usual train: probe, ship (curl), check the script is in the tree.
    rc, out = run(deliver(str(root), run_id, script, url))
    if rc == 3:
        assert f"runctl: script {script} is not in" in out
    # The environment step: the requirements path and a generated file reach the installer unchanged.
    (root / "code" / workdir).mkdir(parents=True, exist_ok=True)
    rc, out = run(
        setup_env(str(root), run_id, digest, workdir, requirements, generated, rebuild=True, python=str(python))
    )
    assert rc == 0, out
    log = (root / "runs" / run_id / "setup.log").read_bytes().decode()
    # The path as the script joins it (an empty name gives ".../code/", not pathlib's ".../code").
    want = str(root / "runs" / run_id / "requirements.txt") if generated is not None else f"{root}/code/{requirements}"
    installed = [json.loads(line) for line in log.split("\n") if line.startswith('["pip"')]
    assert installed and installed[0][-2:] == ["-r", want], log
    assert f"from {requirements}" in log
    if generated is not None:
        assert Path(want).read_bytes().decode() == (generated if generated.endswith("\n") else generated + "\n")
    # The launch: the training gets every value verbatim, the metadata file keeps them as data.
    meta = json.dumps({"run_id": run_id, "script": script, "ref": ref})
    env = {"RUNCTL_RUN_ID": run_id, "USER_VALUE": env_value}
    rc, out = run(
        header(str(root)) + launch_body(run_id, script, args, env, meta, python=argv_json, checkpoint_run_id=resumed)
    )
    assert rc == 0 and "launched" in out, out
    rdir = root / "runs" / run_id
    _wait_for(rdir / "exit_code")
    assert json.loads((rdir / "training.log").read_bytes().decode().split("\n")[0]) == ["-u", script, *args]
    assert json.loads((rdir / "meta.json").read_bytes().decode()) == json.loads(meta)
    assert (rdir / "checkpoint_dir").read_bytes().decode() == f"{root}/runs/{resumed}/checkpoints\n"
    # Everything that reads the run directories back.
    for text in (
        probe_live_runs(str(root)),
        probe_live_runs(str(root), sigterm=True),
        utilization(str(root)),
        runs_status(str(root), [run_id, resumed]),
        stop_run(str(root), run_id, 1, checkpoint_run_id=resumed),
        stop_run(str(root), resumed, 0, force=True),
        list_checkpoints(str(root), resumed),
        list_checkpoints(str(root), run_id + "-missing"),
        list_checkpoints(str(root), None),
        list_all_checkpoints(str(root)),
    ):
        rc, out = run(text)
        assert rc == 0, out
    assert not markers(base), markers(base)
