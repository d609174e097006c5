"""Slack-safe text: untrusted text (from Slack users, the training repo or an instance)
shown literally in mrkdwn.

Slack's rule (api.slack.com "Formatting text for app surfaces", "Escaping text"): `&`, `<`
and `>` are the only control characters; `<!channel>`, `<!here>`, `<!everyone>`, `<@U…>`,
`<#C…>` and `<url|label>` are live markup unless escaped as `&amp;`, `&lt;`, `&gt;`.
A backtick opens or closes a code span or block, so untrusted text has its backticks
replaced by a look-alike that does neither, inside a code span or out of one.
"""

from __future__ import annotations

BACKTICK = "\u02cb"  # ˋ MODIFIER LETTER GRAVE ACCENT: looks like ` but closes no code span


def escape(text: object) -> str:
    """`text` shown as written: no mention, broadcast, link or code span can be smuggled in."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", BACKTICK)


def code(text: object, limit: int = 0) -> str:
    """An inline code span around untrusted text that the text cannot close (one line;
    cut to `limit` characters of the original when given)."""
    raw = str(text)
    if limit and len(raw) > limit:
        raw = raw[: limit - 1] + "…"
    inner = escape(raw.replace("\r", " ").replace("\n", " "))
    return f"`{inner or ' '}`"


def block(text: object) -> str:
    """A code block around untrusted text (many lines) that the text cannot close."""
    inner = escape(text)
    return f"```{inner or ' '}```"
