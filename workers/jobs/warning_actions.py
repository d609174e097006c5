"""What the buttons on a warning do: [Stop now], [Snooze 24h], [Keep running].

The bot acks the click and queues one of these; each updates the warning's
message so the channel sees who decided what.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from workers.commands import Requester
from workers.errors import RunctlError
from workers.jobs.lifecycle import stop_flow
from workers.services import Services, current
from workers.slack.messages.warning import render
from workers.state.warnings import WINDOW, Kind, Status, WarningRecord, WarningStore

log = logging.getLogger(__name__)


def snooze(instance_id: str, kind: str, user_id: str) -> str:
    return _quiet(current(), instance_id, Kind(kind), user_id, Status.SNOOZED, "")


def keep(instance_id: str, kind: str, user_id: str, reason: str = "") -> str:
    return _quiet(current(), instance_id, Kind(kind), user_id, Status.KEPT, reason.strip()[:500])


def stop_now(instance_id: str, kind: str, requester: dict[str, Any]) -> str:
    svc = current()
    actor = Requester.model_validate(requester)
    store = WarningStore(svc.redis)
    record = store.get(instance_id, Kind(kind))
    thread_ts = None
    if record is not None:
        record.status, record.acted_by, record.updated_at = Status.STOPPING, actor.user_id, svc.clock()
        _show(svc, store.save(record))
        thread_ts = record.thread_ts or record.ts
        actor = actor.model_copy(update={"channel_id": record.channel})
    try:
        return stop_flow(svc, instance_id, actor, thread_ts=thread_ts)
    except RunctlError as exc:
        # The stop did not happen: bring the buttons back and say why, in the thread.
        if record is not None:
            record.status, record.acted_by = Status.OPEN, None
            _show(svc, store.save(record))
            svc.notifier.post(record.channel, f"<@{actor.user_id}> {exc.as_text()}", thread_ts=thread_ts)
        else:
            svc.notifier.ephemeral(actor.channel_id, actor.user_id, exc.as_text())
        return exc.what


def _quiet(svc: Services, instance_id: str, kind: Kind, user_id: str, status: Status, reason: str) -> str:
    store = WarningStore(svc.redis)
    record = store.get(instance_id, kind)
    if record is None:
        return "gone"
    now = svc.clock()
    record.status, record.acted_by, record.reason = status, user_id, reason
    record.quiet_until, record.updated_at = now + WINDOW, now
    _show(svc, store.save(record))
    return f"{status.value} until {record.quiet_until:%Y-%m-%d %H:%M} UTC"


def _show(svc: Services, record: WarningRecord) -> None:
    if record.ts is None:
        return
    text, blocks = render(record)
    try:
        svc.notifier.update(record.channel, record.ts, text, blocks)
    except SlackApiError as exc:
        log.warning("could not update warning %s: %s", record.key, exc.response.get("error"))
