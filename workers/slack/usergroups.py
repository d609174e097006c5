"""Slack user groups (`S…` ids) as sets of members, read with usergroups.users.list."""

from __future__ import annotations

import logging
import threading
import time

from slack_sdk.errors import SlackApiError

from workers.settings import Settings
from workers.slack.client import make_client

log = logging.getLogger(__name__)

GROUP_TTL_SECONDS = 300.0
GROUP_FAILURE_TTL_SECONDS = 30.0

_groups: dict[str, tuple[float, frozenset[str]]] = {}
_groups_lock = threading.Lock()
_group_errors: dict[str, str] = {}


def members(settings: Settings, group_id: str) -> frozenset[str]:
    """Members of a Slack user group via usergroups.users.list, cached for 5 minutes.

    Failures fail closed (nobody is a member) and are retried after 30 s."""
    now = time.monotonic()
    with _groups_lock:
        hit = _groups.get(group_id)
        if hit and hit[0] > now:
            return hit[1]
    try:
        resp = make_client(settings).usergroups_users_list(usergroup=group_id)
        members = frozenset(str(u) for u in resp.get("users") or [])
        expires, error = now + GROUP_TTL_SECONDS, ""
    except SlackApiError as exc:
        members = frozenset()
        expires, error = now + GROUP_FAILURE_TTL_SECONDS, str(exc.response.get("error", "error"))
        log.warning("could not list members of user group %s: %s", group_id, error)
    with _groups_lock:
        _groups[group_id] = (expires, members)
        if error:
            _group_errors[group_id] = error
        else:
            _group_errors.pop(group_id, None)
    return members


def forget() -> None:
    with _groups_lock:
        _groups.clear()
        _group_errors.clear()


def trouble() -> str:
    with _groups_lock:
        errors = dict(_group_errors)
    if not errors:
        return ""
    listed = ", ".join(f"{g} ({e})" for g, e in sorted(errors.items()))
    return (
        f" Could not read user group(s) {listed}; members of those groups are refused until it works "
        "(the bot token needs the `usergroups:read` scope)."
    )
