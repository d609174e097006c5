"""The one way into every job, as `@app.error` and the middleware are on the web side.

An RQ entry point is a flow wrapped by `command`, `click` or `system`. The wrapper
validates the command and the acting person, re-checks the current policy and
channel for that person (the policy may have changed since the front door let the
request in), runs the flow, and audits its outcome. A `RunctlError` is told to the
person in the right place (the run's thread, else the thread the click came from,
else ephemeral, else a DM) and audited with `audit.decision_of`; any other
exception is logged with its traceback, told as "internal error" with the command
to check, audited as failed, and re-raised so RQ keeps the job in its failed registry.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block

from workers import audit, policy
from workers.aws import names
from workers.commands import INSTANCE_ID, Actor, Command
from workers.errors import InstanceError, RunctlError
from workers.queueing import SYSTEM as SYSTEM  # funnel.SYSTEM: who acts in a system job
from workers.services import Services, current
from workers.slack.thread import fail
from workers.state.runs import Run, RunState

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Command)
Entry = Callable[..., str]
ENTRIES: set[Entry] = set()  # every entry point the wrappers below made (a test holds JobPath to it)


@dataclass
class Job:
    """What a flow knows about the job it runs: the services, who acts, and where to answer."""

    svc: Services
    actor: Actor
    what: str  # the job's name in the audit trail and in "internal error" replies
    instance_id: str = ""
    run: Run | None = None  # set by a flow acting for a run: its errors go to the run's thread
    thread_ts: str | None = None  # else a thread to answer in (a confirmation, a warning)
    failed_state: RunState = RunState.FAILED  # what the run becomes when the flow raises
    audited: bool = field(default=False, repr=False)

    def allow(self, *actions: str, owner_id: str | None = None, defer_owner: bool = False) -> None:
        """The current policy's verdict for the actor, in the actor's channel (`policy.check`)."""
        policy.recheck(self.svc.settings, self.actor, *actions, owner_id=owner_id, defer_owner=defer_owner)

    def tell(self, text: str, blocks: Sequence[Block] | None = None) -> None:
        """To the actor: in the thread the job belongs to, else privately (ephemeral, else the
        command's response_url where the bot is not in the channel, else DM)."""
        notifier = self.svc.notifier
        thread = self.run.message_ts if self.run is not None else self.thread_ts
        channel = self.run.channel_id if self.run is not None else self.actor.channel_id
        try:
            if thread and channel:
                notifier.post(channel, f"<@{self.actor.user_id}> {text}", blocks, thread_ts=thread)
            elif self.actor.channel_id:
                notifier.ephemeral(
                    self.actor.channel_id, self.actor.user_id, text, blocks, response_url=self.actor.response_url
                )
            else:
                notifier.post(self.actor.user_id, text, blocks)
        except SlackApiError as exc:
            log.warning("could not tell %s: %s", self.actor.user_id, exc.response.get("error"))

    def audit(self, decision: audit.Decision, outcome: str) -> None:
        run_id = self.run.run_id if self.run is not None else ""
        entry = audit.of(self.actor, decision, outcome[:500], run_id=run_id, instance=self.instance_id)
        if not entry.text:
            entry = entry.model_copy(update={"text": self.what})
        audit.record(self.svc.redis, self.svc.settings.RUNCTL_AUDIT_MAXLEN, entry)
        self.audited = True

    def internal_error(self) -> RunctlError:
        check = f"/runctl status {self.instance_id}" if self.instance_id else "/runctl resources"
        return RunctlError(
            f"runctl hit an internal error while doing `{self.what}`.",
            why="Nothing more is known here; the worker log has the traceback.",
            fix=f"Check what happened with `{check}`, then retry.",
        )


def actor_of(value: object) -> Actor:
    """A job's acting person: an Actor's JSON, or a bare user id from older jobs."""
    if isinstance(value, str):
        return Actor(user_id=value, channel_id="")
    return Actor.model_validate(value)


def settle(job: Job, flow: Callable[[], str]) -> str:
    """Run the flow for the job: audit its outcome, tell and audit its failure."""
    try:
        outcome = flow()
    except RunctlError as exc:
        decision = audit.decision_of(exc)
        if isinstance(exc, InstanceError):  # the audit keeps the detail, for admins
            _report(job, exc.seen_by(policy.is_admin(job.svc.settings, job.actor.user_id)))
        else:
            _report(job, exc)
        head = job.run.state.value if job.run is not None else type(exc).__name__
        job.audit(decision, f"{head}: {exc.what}")
        return "refused" if decision == "refused" else exc.what
    except Exception as exc:
        log.exception("job %s for %s crashed", job.what, job.actor.user_id)
        try:
            _report(job, job.internal_error())
        finally:
            job.audit("failed", f"internal error: {type(exc).__name__}")
        raise
    job.audit("allowed", outcome)
    return outcome


def _report(job: Job, error: RunctlError) -> None:
    run = job.run
    if run is not None and not run.state.ended:
        fail(job.svc, run, error, job.failed_state)
    else:
        job.tell(error.as_text())


def command(model: type[C]) -> Callable[[Callable[..., str]], Entry]:
    """A slash command's job: `entry(command_json, actor_json, *extra)` runs
    `flow(job, command, *extra)` after the policy's current verdict on the command
    (its actions, `force` included, and the owner of the run it touches)."""

    def wrap(flow: Callable[..., str]) -> Entry:
        @functools.wraps(flow)
        def entry(raw_command: dict[str, Any], raw_actor: dict[str, Any], *extra: Any) -> str:
            svc = current()
            actor = actor_of(raw_actor)
            cmd = _parse(svc, actor, model, raw_command)
            job = Job(svc, actor, f"/runctl {cmd.name}", instance_id=getattr(cmd, "instance_id", None) or "")

            def run() -> str:
                nonlocal cmd
                cmd = by_id(job, cmd)
                job.instance_id = getattr(cmd, "instance_id", None) or ""
                needed = policy.actions(cmd, svc.settings.RUNCTL_THEN)
                # The owner's tag costs an EC2 call: read it only when the policy asks for an owner.
                tags = (lambda iid: svc.fleet.get(iid).tags) if policy.needs_owner(svc.settings, needed) else None
                policy.recheck_command(svc.settings, actor, cmd, policy.owner_of(svc.redis, cmd, tags=tags))
                return str(flow(job, cmd, *extra))

            return settle(job, run)

        ENTRIES.add(entry)
        return entry

    return wrap


def by_id(job: Job, cmd: C) -> C:
    """The command with an instance typed by name (its `Name` tag) resolved to the id; the
    actor hears when the name matched only after folding case or Unicode form."""
    typed = getattr(cmd, "instance_id", None)
    if not typed or INSTANCE_ID.fullmatch(typed):
        return cmd
    inst = job.svc.fleet.named(typed)
    if inst.name != typed:
        job.tell(names.matched_note(typed, inst))
    return cmd.model_copy(update={"instance_id": inst.id})


def click(what: str, actor_at: int, *actions: str) -> Callable[[Callable[..., str]], Entry]:
    """A button's job: the acting person is argument `actor_at`; `flow(job, *the others)`
    runs after the channel and `actions` (those that need no owner) are re-checked;
    the flow checks what depends on the thing clicked."""

    def wrap(flow: Callable[..., str]) -> Entry:
        @functools.wraps(flow)
        def entry(*args: Any) -> str:
            svc = current()
            actor = actor_of(args[actor_at])
            job = Job(svc, actor, what)
            rest = args[:actor_at] + args[actor_at + 1 :]

            def run() -> str:
                job.allow(*actions, defer_owner=True)  # the flow checks the owner of what was clicked
                return str(flow(job, *rest))

            return settle(job, run)

        ENTRIES.add(entry)
        return entry

    return wrap


def system(what: str) -> Callable[[Callable[..., str]], Entry]:
    """A job the clock or the monitor queues: nobody to tell; a crash is logged and audited."""

    def wrap(flow: Callable[..., str]) -> Entry:
        @functools.wraps(flow)
        def entry(*args: Any) -> str:
            try:
                return str(flow(*args))
            except Exception as exc:
                log.exception("%s crashed", what)
                svc = current()
                entry = audit.of(SYSTEM, "failed", f"internal error: {type(exc).__name__}")
                audit.record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, entry.model_copy(update={"text": what}))
                raise

        ENTRIES.add(entry)
        return entry

    return wrap


def _parse(svc: Services, actor: Actor, model: type[C], raw: dict[str, Any]) -> C:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # Only a job queued by another version (or by hand) gets here: the front door validated it.
        job = Job(svc, actor, f"/runctl {raw.get('name', '?')}")
        job.tell(
            RunctlError(
                "runctl could not read this queued command.",
                why=f"{exc.error_count()} field(s) invalid, e.g. {_first(exc)}.",
                fix="Send the command again.",
            ).as_text()
        )
        job.audit("failed", "invalid job arguments")
        raise


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]
