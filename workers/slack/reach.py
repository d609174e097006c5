"""Where Slack lets the bot speak, and what to tell people when it does not.

A bot posts in public channels with `chat:write.public`, but in a private channel or a
DM only once invited (`channel_not_found` / `not_in_channel`); sharing a file needs
membership even in a public channel. A slash command's response_url works anywhere.
"""

from __future__ import annotations

from slack_sdk.errors import SlackApiError

from workers.errors import SlackRefused
from workers.settings import Settings

CHANNEL_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived"})


def channel_error(exc: SlackApiError) -> str | None:
    """The error, when Slack refused because of the conversation (not a bad day)."""
    error = str(exc.response.get("error") or "")
    return error if error in CHANNEL_ERRORS else None


def refusal(
    settings: Settings, channel: str, error: str, doing: str = "post there", then: str = "run the command again"
) -> SlackRefused:
    ops = settings.RUNCTL_CHANNEL
    instead = f", or run the command in <#{ops}>, where I am" if ops and ops != channel else ""
    why = (
        "Slack lets runctl share files only in channels it was invited to."
        if doing.startswith("share")
        else "Slack lets runctl post only in public channels and in private channels and DMs it was invited to."
    )
    return SlackRefused(
        f"I can't {doing}: Slack answered `{error}` for <#{channel}>.",
        error=error,
        why=why,
        fix=f"invite me: `/invite @runctl` in <#{channel}>, then {then}{instead}.",
    )
