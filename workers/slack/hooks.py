"""Which `response_url`s runctl will POST to: Slack's own, and nothing else.

A request body names its `response_url`; whoever can get a body to us could point it
anywhere (an open POST, SSRF). Every respond goes through `trusted`: the Bolt app
clears any other URL from the request's context before a listener or the error funnel
sees it (bot.app), and a worker that answers a response_url must ask here too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from workers.settings import Settings

SLACK_HOOKS = ("https", "hooks.slack.com")


def trusted(settings: Settings, url: str | None) -> str | None:
    """`url` when it is Slack's (https://hooks.slack.com/…, or the host of the configured
    SLACK_API_URL, which only the sandbox and tests set), else None."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if (parts.scheme, parts.netloc) == SLACK_HOOKS:  # a netloc with user info or a port differs
        return url
    if settings.SLACK_API_URL:
        api = urlsplit(settings.SLACK_API_URL)
        if (parts.scheme, parts.netloc) == (api.scheme, api.netloc) and parts.netloc:
            return url
    return None
