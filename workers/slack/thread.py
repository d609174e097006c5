"""The one parent message of a run, and replies in its thread."""

from __future__ import annotations

import logging
from datetime import timedelta

from slack_sdk.errors import SlackApiError

from workers.context import Context
from workers.errors import ErrorInfo, RunctlError
from workers.queueing import SYSTEM, JobPath, ReplyArgs, enqueue
from workers.slack import updates
from workers.slack.messages.run import full_log_actions, text_blocks
from workers.slack.reach import channel_error, refusal
from workers.state.runs import Run, RunState

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 60  # a reply Slack keeps refusing with 429 is tried this many times (about an hour) before it is logged


def open_run(svc: Context, run: Run) -> Run:
    """Post the run's parent message, before anything touches the instance: a run whose
    channel refuses the bot is never started (SlackRefused, with the fix)."""
    if run.message_ts is not None:  # a retried job: the message is there
        return publish(svc, run)
    text, blocks = updates.render(svc, run)
    try:
        run.message_ts = svc.notifier.post(run.channel_id, text, blocks)
    except SlackApiError as exc:
        error = channel_error(exc)
        if error is None:  # Slack's bad day, past the client's retries: the next publish posts it
            log.warning("could not post run %s: %s", run.run_id, exc.response.get("error"))
            return svc.runs.save(run)
        raise refusal(svc.settings, run.channel_id, error, "follow this run there") from None
    updates.posted(svc, run)
    tell_notes(svc, run)
    return svc.runs.save(run)


def tell_notes(svc: Context, run: Run) -> None:
    """The run's notes not yet said (added --checkpoint-interval, the environment built),
    once each, in its thread: the parent shows the run, not its start's remarks."""
    fresh = run.notes[run.notes_told :]
    if run.message_ts is None or not fresh:
        return
    try:
        svc.notifier.post(run.channel_id, "\n".join(fresh), thread_ts=run.message_ts)
    except SlackApiError as exc:
        log.warning("could not tell the notes of run %s: %s", run.run_id, exc.response.get("error"))
        return
    run.notes_told = len(run.notes)


def publish(svc: Context, run: Run) -> Run:
    """Post the parent message the first time; afterwards save the run and have its message
    show it, within Slack's update budget (workers.slack.updates: the last state wins)."""
    if run.message_ts is not None:
        tell_notes(svc, run)
        saved = svc.runs.save(run)
        updates.show(svc, saved)
        return saved
    if run.state is RunState.REFUSED and run.error and run.error.kind == "SlackRefused":
        return svc.runs.save(run)  # the channel refused it once: don't knock again
    text, blocks = updates.render(svc, run)
    try:
        run.message_ts = svc.notifier.post(run.channel_id, text, blocks)
        updates.posted(svc, run)
        tell_notes(svc, run)
    except SlackApiError as exc:
        log.warning("could not publish run %s: %s", run.run_id, exc.response.get("error"))
    return svc.runs.save(run)


def reply(svc: Context, run: Run, text: str, mention: bool = True, full_log: bool = False) -> None:
    """In the run's thread; when the run has no message (its channel refused the bot), to
    the requester privately, through the command's response_url where it still works.
    ``full_log``: the run's final reply, with its [Full log] button."""
    if run.message_ts is None:
        privately(svc, run, text)
        return
    said = f"<@{run.user_id}> {text}" if mention else text
    deliver(svc, run, said, full_log)


def deliver(svc: Context, run: Run, said: str, full_log: bool, attempt: int = 0) -> bool:
    """Post a reply in the run's thread; True once Slack took it. Past the client's retries of a
    429 (a burst of ends in one channel meets its 1 a second), the reply is not dropped: a job
    posts it after Retry-After (workers/jobs/replies.py), up to MAX_ATTEMPTS times."""
    assert run.message_ts is not None
    blocks = [*text_blocks(said), full_log_actions(run.run_id)] if full_log else None
    try:
        svc.notifier.post(run.channel_id, said, blocks, thread_ts=run.message_ts)
        return True
    except SlackApiError as exc:
        if exc.response.status_code == 429 and attempt < MAX_ATTEMPTS:
            after = _seconds(exc.response.headers.get("Retry-After")) + attempt  # a little later each time
            args = ReplyArgs(run_id=run.run_id, text=said, full_log=full_log, attempt=attempt + 1)
            enqueue(svc.queue, JobPath.REPLY, args, SYSTEM, delay=timedelta(seconds=after))
            log.info("reply on run %s rate-limited: again in %.0f s", run.run_id, after)
            return False
        log.warning("could not reply on run %s: %s", run.run_id, exc.response.get("error"))
        if channel_error(exc):
            privately(svc, run, said)
        return False


def _seconds(value: object) -> float:
    try:
        return max(1.0, float(str(value)))
    except ValueError:
        return 1.0


def privately(svc: Context, run: Run, text: str) -> None:
    """To the run's requester only (`client.privately`: it logs what Slack refuses)."""
    svc.notifier.ephemeral(run.channel_id, run.user_id, text, response_url=run.response_url)


def fail(svc: Context, run: Run, error: RunctlError | ErrorInfo, state: RunState) -> Run:
    info = error.info() if isinstance(error, RunctlError) else error
    run.error = info
    run.state = state
    run.ended_at = run.ended_at or svc.clock()
    if run.message_ts is None and state is RunState.REFUSED:
        # Refused before its parent was posted (pre-flight): only the requester hears of it.
        svc.runs.save(run)
        privately(svc, run, info.as_text())
        return run
    publish(svc, run)
    reply(svc, run, info.as_text())
    return run
