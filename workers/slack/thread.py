"""The one parent message of a run, and replies in its thread."""

from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from workers.errors import ErrorInfo, RunctlError
from workers.services import Services
from workers.slack.messages.run import run_blocks
from workers.state.runs import Run, RunState

log = logging.getLogger(__name__)


def publish(svc: Services, run: Run) -> Run:
    """Post the parent message the first time, update it in place afterwards."""
    text, blocks = run_blocks(run, svc.clock())
    try:
        if run.message_ts is None:
            run.message_ts = svc.notifier.post(run.channel_id, text, blocks)
        else:
            svc.notifier.update(run.channel_id, run.message_ts, text, blocks)
    except SlackApiError as exc:
        log.warning("could not publish run %s: %s", run.run_id, exc.response.get("error"))
    return svc.runs.save(run)


def reply(svc: Services, run: Run, text: str, mention: bool = True) -> None:
    if mention:
        text = f"<@{run.user_id}> {text}"
    try:
        svc.notifier.post(run.channel_id, text, thread_ts=run.message_ts)
    except SlackApiError as exc:
        log.warning("could not reply on run %s: %s", run.run_id, exc.response.get("error"))


def fail(svc: Services, run: Run, error: RunctlError | ErrorInfo, state: RunState) -> Run:
    info = error.info() if isinstance(error, RunctlError) else error
    run.error = info
    run.state = state
    run.ended_at = run.ended_at or svc.clock()
    publish(svc, run)
    reply(svc, run, info.as_text())
    return run
