"""People's names for charts and listings: users.info (needs `users:read`), cached in
Redis for a day, and never two people under one label; and names typed as plain text
(`--user @alice`, not picked from Slack's list) resolved to ids with users.list."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from workers.context import Context
from workers.errors import RunctlError
from workers.slack.escape import code

log = logging.getLogger(__name__)
NAME_TTL_SECONDS = 86400
FAILED_TTL_SECONDS = 300  # a failed look-up is tried again after 5 minutes
PAGE = 200  # Slack's pagination guide: 100-200 a page; no limit risks limit_required


def profile(svc: Context, user_id: str) -> tuple[str, str]:
    """(display name, real name) of a Slack user; the id itself when Slack will not say."""
    key = f"runctl:user:{user_id}"
    cached = svc.redis.get(key)
    if cached is not None:
        display, real = json.loads(cached)
        return str(display), str(real)
    try:
        user = svc.notifier.client.users_info(user=user_id)["user"]
        prof = user.get("profile") or {}
        real = str(prof.get("real_name") or user.get("real_name") or user.get("name") or user_id)
        display = str(prof.get("display_name") or real)
        ttl = NAME_TTL_SECONDS
    except (SlackApiError, KeyError, TypeError) as exc:
        error = exc.response.get("error") if isinstance(exc, SlackApiError) else type(exc).__name__
        log.warning("users.info %s failed: %s (the token needs users:read)", user_id, error)
        display = real = user_id
        ttl = FAILED_TTL_SECONDS
    svc.redis.set(key, json.dumps([display, real]), ex=ttl)
    return display, real


def labels(svc: Context, user_ids: Iterable[str]) -> dict[str, str]:
    """A distinct label per user id: the display name; people who share one get their real
    name added, and if that is shared too, their id."""
    found = {uid: profile(svc, uid) for uid in dict.fromkeys(user_ids)}
    by_label: dict[str, list[str]] = defaultdict(list)
    for uid, (display, _) in found.items():
        by_label[display].append(uid)
    out: dict[str, str] = {}
    for display, uids in by_label.items():
        if len(uids) == 1:
            out[uids[0]] = display
            continue
        reals = [found[u][1] for u in uids]
        for uid, real in zip(uids, reals, strict=True):
            distinct = reals.count(real) == 1 and real != display
            out[uid] = f"{display} ({real})" if distinct else f"{display} ({uid})"
    return out


def resolve(client: WebClient, person: str, command: str) -> str:
    """`person` as the grammar kept it: a user id, or `@name` to look up. Exactly one live
    member must carry that name; otherwise the requester is told which ones do."""
    if not person.startswith("@"):
        return person
    wanted = person[1:].casefold()
    fix = f"Pick the person from Slack's @ list, so the command carries their mention: `/runctl {command} --user @…`"
    found: list[str] = []
    cursor = ""
    while True:
        try:
            page = client.users_list(limit=PAGE, cursor=cursor or None)
        except SlackApiError as exc:  # e.g. missing_scope: users.list needs users:read
            raise RunctlError(
                f"runctl could not look up {code(person)}.",
                why=f"Slack's users.list answered {code(exc.response.get('error'))}.",
                fix=fix,
            ) from None
        members: list[dict[str, Any]] = page.get("members") or []
        found += [str(m["id"]) for m in members if not m.get("deleted") and wanted in _names(m)]
        cursor = (page.get("response_metadata") or {}).get("next_cursor") or ""
        if not cursor:
            break
    if not found:
        raise RunctlError(
            f"No one in this Slack workspace is called {code(person)}.",
            why="runctl compared it with every member's username, display name and full name.",
            fix=fix,
        )
    if len(found) > 1:
        raise RunctlError(
            f"{len(found)} people are called {code(person)}: {', '.join(f'<@{u}>' for u in found)}.",
            fix=fix,
        )
    return found[0]


def _names(member: dict[str, Any]) -> set[str]:
    profile = member.get("profile") or {}
    names = (member.get("name"), member.get("real_name"), profile.get("display_name"), profile.get("real_name"))
    return {str(n).casefold() for n in names if n}
