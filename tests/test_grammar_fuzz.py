"""Any text after `/runctl` gives a command model or a UsageError, never another exception."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.grammar import MAX_TEXT, SPECS, parse
from workers.commands import Command
from workers.errors import UsageError

TOKENS = [
    *SPECS,
    "TRAIN",
    "--",
    "-",
    "---",
    "--ref",
    "--ref=",
    "--ref=main",
    "--ref=-x",
    "--ref=a..b",
    "--force",
    "--wait",
    "--wait=true",
    "--wait=maybe",
    "--no-wait",
    "--sync-code=false",
    "--checkpoint-interval",
    "--checkpoint-interval=0",
    "--checkpoint-interval=-1",
    "--checkpoint-interval=99999999999999999999",
    "--grace",
    "--grace=3601",
    "--all",
    "--sort",
    "--sort=cost",
    "--sort=price",
    "--user",
    "<@U0ALICE>",
    "<@U0ALICE|alice>",
    "@U0BOB",
    "@nobody",
    "--instance",
    "--run",
    "--run=../x",
    "i-0123456789abcdef0",
    "i-01234567",
    "i-XYZ",
    "i-",
    "train.py",
    "a/b.py",
    "../x.py",
    "/etc/x.py",
    "~/x.py",
    "a\\b.py",
    "x.sh",
    "./x.py",
    "a//b.py",
    "200",
    "201",
    "0",
    "-5",
    "1.5",
    "$(id)",
    "`id`",
    ";",
    "&&",
    "|",
    "'",
    '"',
    "“",
    "”",
    "‘",
    "’",
    "\\",
    "\n",
    "\t",
    "\x00",
    "\x7f",
    "\u2028",
    "🙂",
    "日本",
    " ",
    "''",
    '""',
    "'a b'",
    '"a\\"b"',
]


PREFIXES = [
    "train i-0123456789abcdef0 train.py",
    "status i-0123456789abcdef0",
    "stop i-0123456789abcdef0",
    "start i-0123456789abcdef0",
    "terminate i-0123456789abcdef0",
    "checkpoints i-0123456789abcdef0",
    "resources",
    "audit",
    "help",
    "",
]


def random_text(rng: random.Random) -> str:
    pieces = [rng.choice(PREFIXES)]
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.75:
            pieces.append(rng.choice(TOKENS))
        elif roll < 0.9:
            pieces.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(1, 6))))
        else:
            pieces.append(rng.choice(TOKENS) + rng.choice(TOKENS))
    return rng.choice([" ", "  ", "\t", ""]).join(pieces)


def outcome(text: str) -> str:
    try:
        result = parse(text)
    except UsageError as exc:
        assert exc.what and exc.as_text().startswith(":warning:")
        return "usage"
    assert isinstance(result, Command)
    return result.name


def test_ten_thousand_random_command_texts() -> None:
    rng = random.Random(20240606)
    seen = {outcome(random_text(rng)) for _ in range(10_000)}
    # The generator reaches real commands, not only errors.
    assert {"usage", "help", "status", "train", "stop", "resources", "audit"} <= seen


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_unicode(text: str) -> None:
    outcome(text)


def test_oversized_and_control_inputs_say_why() -> None:
    cases = {
        "x" * (MAX_TEXT + 1): "the limit is 4000",
        "train i-0123456789abcdef0 t.py -- " + "a " * 120: "Too many arguments",
        "train i-0123456789abcdef0 t.py -- " + "a" * 1001: "the limit is 1000",
        "train i-0123456789abcdef0 t.py -- 'a\nb'": "control character",
        "train i-0123456789abcdef0 t.py -- 'a\x00b'": "control character",
        "train i-0123456789abcdef0 t.py --ref -x": "not a valid git ref",
        "train i-0123456789abcdef0 t.py --ref=-x": "not a valid git ref",
        "train i-0123456789abcdef0 ../t.py": "leaves the repository",
        "train i-0123456789abcdef0 /t.py": "is absolute",
        "train i-0123456789abcdef0 t.py -- 'unclosed": "check your quotes",
    }
    for text, expected in cases.items():
        try:
            parse(text)
        except UsageError as exc:
            assert expected in exc.what, (text, exc.what)
        else:
            raise AssertionError(f"accepted {text!r}")
