"""`/runctl terminate`: only through a confirmation button; the confirmation, its clicks and
the terminate itself (halt, back up, terminate)."""

from __future__ import annotations

import logging

from workers.aws import backups
from workers.aws.instance import Instance
from workers.commands import Actor, TerminateCommand
from workers.errors import AgentOffline, RunctlError
from workers.jobs import funnel, queued, spot_request
from workers.jobs.backup import backup_runs
from workers.jobs.confirm import ConfirmClick, answer
from workers.jobs.funnel import Job
from workers.jobs.halt import Halter
from workers.jobs.launch import LaunchClick
from workers.jobs.session import holder, session_cost
from workers.jobs.stop import stop_flow
from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint, discover_all
from workers.services import Services
from workers.slack.ids import ActionId
from workers.slack.messages.lifecycle import Cost, checkpoints_summary, confirmation_blocks
from workers.state.confirmations import Confirmation, ConfirmStore, Shown, new_nonce
from workers.state.locks import operation
from workers.state.runs import Run
from workers.state.uptime import UptimeLedger

log = logging.getLogger(__name__)

TERMINATED_WAIT_SECONDS = 120


@funnel.command(TerminateCommand)
def terminate(job: Job, cmd: TerminateCommand) -> str:
    return ask_to_terminate(job.svc, cmd.instance_id, job.actor)


@funnel.click("click confirmation", 2)
def confirm_click(job: Job, action: str, nonce: str, message_ts: str) -> str:
    """A click on a terminate confirmation's button: [Terminate], [Stop instead], [Cancel]
    (`confirm_click(action, nonce, actor, message_ts)`). Launch clicks have their own path
    (`launch.confirm_click`); those queued here by the release before it still work here."""
    kind = LaunchClick if ActionId(action) in LaunchClick.ACTIONS else TerminateClick
    return kind(job, ActionId(action), nonce, message_ts).handle()


def ask_to_terminate(svc: Services, iid: str, actor: Actor) -> str:
    """Post the confirmation in the channel; nothing touches the instance until a click."""
    inst = svc.fleet.get(iid)
    if inst.state in ("terminated", "shutting-down"):
        text = f"{inst.label} is already `{inst.state}`; there is nothing to terminate."
        answer(svc, actor, text)
        return text
    now = svc.clock()
    live, listings, note, shown = what_would_be_lost(svc, inst)
    risky = at_risk(svc, listings)
    conf = Confirmation(
        nonce=new_nonce(),
        instance_id=iid,
        requester_id=actor.user_id,
        channel_id=actor.channel_id,
        created_at=now,
        shown=shown,
    )
    text, blocks = confirmation_blocks(
        inst,
        session_cost(svc, inst, now) if inst.state == "running" else Cost(None, "", ""),
        live,
        checkpoints_summary(listings, now, note, risky) + queued_note(svc, iid),
        conf.nonce,
        actor.user_id,
        conf.expires_at,
        now,
        without_backup=risky is not None and any(risky.values()),
    )
    conf.message_ts = svc.notifier.post(actor.channel_id, text, blocks)
    ConfirmStore(svc.redis).save(conf)
    return text


def queued_note(svc: Services, iid: str) -> str:
    """The queue, which terminating cancels: each run and who queued it."""
    lines = queued.lines_for(svc, iid)
    if not lines:
        return ""
    return (
        f"\n:inbox_tray: *{len(lines)} queued run{'s' if len(lines) != 1 else ''}* wait for this instance; "
        "terminating cancels them (each requester is told):\n" + "\n".join(lines)
    )


def what_would_be_lost(svc: Services, inst: Instance) -> tuple[Run | None, list[CheckpointListing] | None, str, Shown]:
    """The live run and the checkpoints a terminate would destroy, and their summary for a re-check."""
    listings: list[CheckpointListing] | None = None
    note = ""
    if inst.state == "running":
        try:
            listings = discover_all(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, inst.id)
        except RunctlError as exc:
            note = exc.what
    else:
        note = f"the instance is `{inst.state}`, so runctl can't look; anything on its root volume is deleted"
    live = svc.runs.live_on(inst.id)
    runs = None if listings is None else tuple(sorted(ls.run_id or "" for ls in listings if ls.checkpoints))
    return (
        live,
        listings,
        note,
        Shown(state=inst.state, live_run_id=live.run_id if live else None, checkpoint_runs=runs),
    )


def at_risk(svc: Services, listings: list[CheckpointListing] | None) -> dict[str, list[FoundCheckpoint]] | None:
    """By run, the listed checkpoints a terminate would lose: those not in S3 as they are on
    the disk. None when S3 could not be asked (then every one counts as lost)."""
    if listings is None:
        return None
    risky: dict[str, list[FoundCheckpoint]] = {}
    try:
        for ls in listings:
            if ls.run_id and ls.checkpoints:
                stored = backups.load_bound(svc.fleet, ls.run_id, svc.runs.get)
                risky[ls.run_id] = [c for c in ls.checkpoints if stored is None or not stored.holds(c)]
    except RunctlError as exc:
        log.warning("could not read the S3 backups: %s", exc.what)
        return None
    return risky


class TerminateClick(ConfirmClick):
    """[Terminate], [Terminate without backup], [Stop instead], [Cancel] on a terminate confirmation."""

    def handle(self) -> str:
        mention = f"<@{self.actor.user_id}>"
        label = {
            ActionId.TERMINATE_CONFIRM: "Terminate",
            ActionId.TERMINATE_NO_BACKUP: "Terminate without backup",
            ActionId.TERMINATE_STOP_INSTEAD: "Stop instead",
            ActionId.TERMINATE_CANCEL: "Cancel",
        }.get(self.action, self.action.value)
        destroys = self.action if self.action is ActionId.TERMINATE_NO_BACKUP else ActionId.TERMINATE_CONFIRM
        conf = self.claim(label, destroys, "terminate")
        if conf is None:
            return self.too_late()
        if self.action is ActionId.TERMINATE_CANCEL:
            return self.show(conf, f":x: Terminate of `{conf.instance_id}` cancelled by {mention}.")
        if self.action is ActionId.TERMINATE_STOP_INSTEAD:
            self.show(conf, f":octagonal_sign: {mention} chose to stop `{conf.instance_id}` instead. Stopping…")
            try:
                outcome = stop_flow(self.svc, conf.instance_id, self.actor, thread_ts=conf.message_ts)
            except RunctlError as exc:
                self.show(
                    conf,
                    f":octagonal_sign: {mention} chose to stop instead of terminating: it did not happen: {exc.what}",
                )
                raise
            return self.show(conf, f":octagonal_sign: {mention} chose to stop instead of terminating: {outcome}")
        backup = self.action is ActionId.TERMINATE_CONFIRM
        doing = "backing up its checkpoints, then terminating" if backup else "terminating without backup"
        self.show(conf, f":hourglass_flowing_sand: {mention} confirmed: {doing} `{conf.instance_id}`…")
        try:
            with operation(self.svc.redis, conf.instance_id, holder(self.svc, self.actor, "terminate")):
                text, changed = self.terminate(conf, backup)
        except RunctlError as exc:
            self.show(conf, f":warning: Terminate of `{conf.instance_id}` did not happen: {exc.what}")
            raise
        self.show(conf, text)
        if changed:
            self.store.settle(self.nonce, "it was out of date; a fresh confirmation was posted")
            requester = self.actor.model_copy(update={"channel_id": conf.channel_id})
            ask_to_terminate(self.svc, conf.instance_id, requester)
        return text

    def terminate(self, conf: Confirmation, backup: bool = True) -> tuple[str, bool]:
        """What happened, and whether a fresh confirmation must be asked (what it showed changed,
        or the backup failed). `backup`: copy the checkpoints S3 lacks there first."""
        svc = self.svc
        iid = conf.instance_id
        inst = svc.fleet.get(iid)
        if inst.state in ("terminated", "shutting-down"):
            return f"{inst.label} is already `{inst.state}`; nothing was done.", False
        if inst.state == "stopping":
            return (
                f"{inst.label} is `stopping` (someone is stopping it); nothing was terminated. "
                f"Run `/runctl terminate {iid}` again once it is stopped."
            ), False
        if conf.shown is not None:
            changes = conf.shown.changes(what_would_be_lost(svc, inst)[3])
            if changes:
                return (
                    f":arrows_counterclockwise: Nothing was terminated: since this was asked, "
                    f"{'; '.join(changes)}. A fresh confirmation with what would be lost now follows."
                ), True
        try:  # before anything touches it: a request left open would relaunch it
            cancelled = spot_request.cancel_for(svc, inst, "terminated")
        except RunctlError as exc:
            return f"{exc.what}\nFix: {exc.fix}", False
        now = svc.clock()
        cost = session_cost(svc, inst, now) if inst.state == "running" else None
        reports: list[str] = []
        # Before the live run is halted: its end must not start the next run on a dying instance.
        dropped = queued.drop_all(svc, iid, f"`{iid}` was terminated by <@{self.actor.user_id}>")
        if dropped:
            reports.append(
                f":x: {len(dropped)} queued run{'s' if len(dropped) != 1 else ''} cancelled, "
                "each requester told: " + ", ".join(f"`{d}`" for d in dropped) + "."
            )
        if inst.state == "running":
            known = svc.runs.live_on(iid)
            halter = Halter(svc, inst, self.actor, svc.settings.RUNCTL_STOP_GRACE_SECONDS, False, "terminate")
            try:
                reports = [h.report for h in halter.halt_all(known)]
            except AgentOffline as exc:
                reports = [f":warning: Could not reach the instance to let a training save first ({exc.what})."]
        if backup and inst.state == "running":
            saved, ok = self.back_up(inst)
            if not ok:
                return (
                    f":warning: Nothing was terminated: the backup did not complete, so terminating would lose "
                    f"checkpoints. {saved}\nA fresh confirmation follows: [Terminate] tries the backup again, "
                    "[Terminate without backup] terminates anyway.\n" + "\n".join(reports)
                ).strip(), True
            if saved:
                reports.append(saved)
        svc.fleet.terminate(iid)
        inst = svc.fleet.wait_for_state(iid, ("shutting-down", "terminated"), TERMINATED_WAIT_SECONDS)
        UptimeLedger(svc.redis).observe(iid, "terminated", None, now)
        asked = f" (asked by <@{conf.requester_id}>)" if conf.requester_id != self.actor.user_id else ""
        lines = [f":wastebasket: *{inst.label}* terminated by <@{self.actor.user_id}>{asked}; it is `{inst.state}`."]
        lines += [cancelled, *reports] if cancelled else reports
        if cost is not None:
            lines.append(cost.text("Up this session"))
        return "\n".join(lines), False

    def back_up(self, inst: Instance) -> tuple[str, bool]:
        """Back up what would be lost (after the halts, so a final checkpoint is among it)."""
        svc = self.svc
        try:
            listings = discover_all(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, inst.id)
            risky = at_risk(svc, listings) or {ls.run_id or "": ls.checkpoints for ls in listings}
            runs = [rid for rid, cks in risky.items() if rid and cks]
            if not runs:
                return "", True
            outcome = backup_runs(svc, inst, runs)
        except RunctlError as exc:
            return f"The backup failed: {exc.what}", False
        # What S3 cannot take (too big, a directory) the confirmation said would be lost; a failed upload was not.
        done = all(not r.failed for r in outcome.runs)
        return f":cloud: Backup: {outcome.text(svc.settings.RUNCTL_S3_BUCKET or '')}", done
