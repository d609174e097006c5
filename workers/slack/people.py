"""People's names for charts and listings: users.info (needs `users:read`), cached in
Redis for a day, and never two people under one label."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable

from slack_sdk.errors import SlackApiError

from workers.services import Services

log = logging.getLogger(__name__)
NAME_TTL_SECONDS = 86400
FAILED_TTL_SECONDS = 300  # a failed look-up is tried again after 5 minutes


def profile(svc: Services, user_id: str) -> tuple[str, str]:
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


def labels(svc: Services, user_ids: Iterable[str]) -> dict[str, str]:
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
