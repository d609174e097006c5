"""A click on a confirmation's button: the confirmation is taken once, by someone the policy
lets answer it, and replaced by what happened. Terminate's (workers/jobs/terminate.py) and
launch's (workers/jobs/launch.py) clicks are these."""

from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from workers import policy
from workers.commands import Actor
from workers.jobs.funnel import Job
from workers.services import Services
from workers.slack.ids import ActionId
from workers.slack.messages.lifecycle import closed_blocks
from workers.state.confirmations import Confirmation, ConfirmStore

log = logging.getLogger(__name__)


def answer(svc: Services, actor: Actor, text: str, thread_ts: str | None = None) -> None:
    """In the thread when there is one (everyone sees button outcomes), else privately."""
    try:
        if thread_ts:
            svc.notifier.post(actor.channel_id, f"<@{actor.user_id}> {text}", thread_ts=thread_ts)
        else:
            svc.notifier.ephemeral(actor.channel_id, actor.user_id, text, response_url=actor.response_url)
    except SlackApiError as exc:
        log.warning("could not answer %s: %s", actor.user_id, exc.response.get("error"))


class ConfirmClick:
    """What every confirmation click shares; each kind of confirmation `handle`s its own buttons."""

    def __init__(self, job: Job, action: ActionId, nonce: str, message_ts: str) -> None:
        self.job = job
        self.svc = job.svc
        self.action = action
        self.nonce = nonce
        self.actor = job.actor
        self.message_ts = message_ts
        self.store = ConfirmStore(job.svc.redis)

    def claim(self, label: str, confirm: ActionId, verb: str) -> Confirmation | None:
        """Take the confirmation, once, for a click labelled `label`; None when it was used or expired.
        The policy is the one now, not the one the front door saw: a refusal leaves the buttons to others;
        the `confirm` button also needs the right to `verb`."""
        asked = self.store.receipt(self.nonce)
        if asked is not None:
            if asked.instance_id:
                self.job.instance_id = asked.instance_id
            policy.check_answer(self.svc.settings, self.actor.user_id, asked.requester_id)
            if self.action is confirm:
                self.job.allow(verb)
        conf = self.store.consume(self.nonce, f"<@{self.actor.user_id}> clicked {label}")
        if conf is not None:
            self.job.thread_ts = conf.message_ts  # from here on, everyone sees what happened
        return conf

    def too_late(self) -> str:
        outcome = self.store.outcome(self.nonce)
        if outcome:
            text = f"This confirmation was already used: {outcome}."
            answer(self.svc, self.actor, text)
            return text
        asked = self.store.receipt(self.nonce)
        iid = asked.instance_id if asked else "<instance-id>"
        again = asked.command if asked and asked.command else f"/runctl terminate {iid}"
        text = f"This confirmation expired. Run `{again}` again."
        answer(self.svc, self.actor, text)
        if asked is not None:
            self.store.settle(self.nonce, "it expired")
            self.show(asked, f":hourglass: {text}")
        return text

    def show(self, conf: Confirmation, text: str) -> str:
        """Replace the confirmation with `text`, without buttons."""
        blocks_text, blocks = closed_blocks(text)
        self.svc.notifier.try_update(
            conf.channel_id,
            conf.message_ts or self.message_ts,
            blocks_text,
            blocks,
            what=f"the {conf.kind} confirmation",
        )
        return text
