"""Slack-safe text: what untrusted text may and may not do in a message."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from workers.slack.escape import BACKTICK, block, code, escape

LIVE = re.compile(r"<[!@#]|<https?:|<mailto:")


def test_escape_turns_broadcasts_mentions_and_links_into_text() -> None:
    hostile = "<!channel> <!here> <!everyone> <@U0ADMIN> <#C0X> <https://evil|Slack: session expired> a&b"
    out = escape(hostile)
    assert not LIVE.search(out) and "<" not in out and ">" not in out
    assert out.startswith("&lt;!channel&gt;") and "a&amp;b" in out
    assert escape("`x`") == f"{BACKTICK}x{BACKTICK}"  # no code span opened outside one either


def test_a_code_span_cannot_be_closed_from_inside() -> None:
    out = code("x` <!channel> `y")
    assert out == f"`x{BACKTICK} &lt;!channel&gt; {BACKTICK}y`"
    assert out.count("`") == 2
    assert code("two\nlines") == "`two lines`"
    assert code("") == "` `"
    assert code("a" * 50, limit=10) == "`" + "a" * 9 + "…`"


def test_a_code_block_cannot_be_closed_from_inside() -> None:
    out = block("line\n```\n<!here>")
    assert out.startswith("```") and out.endswith("```") and out.count("`") == 6
    assert "&lt;!here&gt;" in out


@given(st.text())
def test_no_text_yields_markup_or_an_extra_backtick(text: str) -> None:
    for out in (escape(text), code(text), block(text)):
        assert "<" not in out and ">" not in out
    assert "`" not in escape(text)
    assert code(text).count("`") == 2 and block(text).count("`") == 6
