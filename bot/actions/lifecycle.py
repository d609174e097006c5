"""Placeholder until its issue lands; see the issue tracker."""

from slack_bolt import App


def register(app: App) -> None:
    return None
