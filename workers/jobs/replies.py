"""A thread reply Slack refused with 429 past the client's retries, posted again later
(workers/slack/thread.py `deliver`): an end's reply is never dropped."""

from __future__ import annotations

from workers.jobs import funnel
from workers.services import current
from workers.slack import thread


@funnel.system("a delayed thread reply")
def deliver(run_id: str, text: str, full_log: bool = False, attempt: int = 1) -> str:
    svc = current()
    run = svc.runs.get(run_id)
    if run is None or run.message_ts is None:
        return "its run or its message is gone"
    return "posted" if thread.deliver(svc, run, text, full_log, attempt) else "not posted (yet)"
