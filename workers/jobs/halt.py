"""Halting the training runs alive on an instance (shared by stop and terminate): SIGTERM,
the grace wait, what was saved or lost, and the run closed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from workers import remote
from workers.aws.instance import Instance, ScriptResult
from workers.commands import Actor
from workers.errors import AgentOffline, RemoteError, RunctlError
from workers.jobs import multinode, summary
from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint, discover
from workers.remote.lifecycle import StopResult, parse_stop
from workers.services import Services
from workers.slack.escape import code
from workers.slack.format import duration, size
from workers.slack.messages.lifecycle import checkpoint_line
from workers.slack.thread import publish, reply
from workers.state.locks import train_lock
from workers.state.runs import Checkpoint, Run, RunState

log = logging.getLogger(__name__)


@dataclass
class Halt:
    run_id: str
    run: Run | None
    result: StopResult
    listing: CheckpointListing | None
    report: str

    @property
    def saved(self) -> FoundCheckpoint | None:
        return _saved_since_signal(self.listing, self.result)


def _saved_since_signal(listing: CheckpointListing | None, result: StopResult) -> FoundCheckpoint | None:
    if listing is None:
        return None
    fresh = [c for c in listing.checkpoints if c.name in result.saved]
    return max(fresh, key=lambda c: (c.epoch or 0, c.modified_at), default=None)


def _newest(listing: CheckpointListing | None) -> FoundCheckpoint | None:
    if listing is None:
        return None
    return listing.newest_valid or listing.newest


def unconfirmed(result: ScriptResult, label: str, instance_id: str, what: str) -> RunctlError:
    """A script that did not report: the agent never took it, or it did not finish. Either way
    nothing tells whether the training is alive, so callers must not go on as if it were not."""
    status = f"{result.status}/{result.details}" if result.details else result.status
    if not result.delivered:
        return AgentOffline(
            f"The SSM agent on {label} did not take the command to {what} ({status}).",
            why="The agent is offline or lost its connection, so the training got no SIGTERM and "
            "nothing could tell whether it is alive.",
            fix="Check `sudo systemctl status amazon-ssm-agent` on the instance and its instance profile "
            "(AmazonSSMManagedInstanceCore), then retry.",
        )
    return RemoteError(
        f"The command to {what} on {label} did not finish ({status}, exit {result.exit_code}).",
        why="runctl can't tell whether the training saved a checkpoint or is still alive.",
        fix=f"`/runctl status {instance_id}`, then retry.",
        detail=(result.stderr or result.stdout).strip()[-1500:],
    )


def _already_saved(newest: FoundCheckpoint | None, finished: int | None) -> str:
    """When the newest checkpoint holds the last finished epoch, what a stop costs (only the
    epoch in progress); "" when that is not known to be so (then progress may be lost)."""
    if newest is None or newest.epoch is None or finished is None or newest.epoch < finished:
        return ""
    return (
        f"the newest checkpoint (epoch {newest.epoch}, {code(newest.name)}) was already saved; "
        f"the partial epoch {newest.epoch + 1} is discarded"
    )


class Halter:
    """Stops the training runs alive on an instance, each given SIGTERM and `grace` seconds."""

    def __init__(
        self,
        svc: Services,
        inst: Instance,
        actor: Actor,
        grace: int,
        force: bool,
        why: Literal["stop", "terminate"],
    ) -> None:
        self.svc = svc
        self.inst = inst
        self.actor = actor
        self.grace = grace
        self.force = force
        self.why = why  # recorded as the run's ended_by
        self.root = svc.settings.RUNCTL_REMOTE_ROOT
        self.sigterm: dict[str, str] = {}  # run id -> caught/ignored/default, from the live probe

    def live_run_ids(self, known: Run | None) -> list[str]:
        """Runs alive on the instance (its pid files are the truth) plus the one Redis knows."""
        ids = [known.run_id] if known else []
        result = self.svc.fleet.run(self.inst.id, remote.probe_live_runs(self.root, sigterm=True))
        if not result.ok:
            raise self.unconfirmed(result, "look for live trainings")
        self.sigterm = remote.parse_sigterm(result.stdout)
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "live" and parts[1] not in ids:
                ids.append(parts[1])
        return ids

    def halt_all(self, known: Run | None) -> list[Halt]:
        return [self.halt(run_id) for run_id in self.live_run_ids(known)]

    def halt(self, run_id: str) -> Halt:
        svc = self.svc
        run = svc.runs.get(run_id)
        if run is not None and not run.state.ended:
            run.state = RunState.STOPPING
            publish(svc, run)
            verb = "Killing it at once (`--force`)" if self.force else f"SIGTERM, up to {self.grace} s to save"
            if not self.force and self.sigterm.get(run_id) == "default":
                had = f" (the newest runctl saw: {code(run.checkpoint.name)})" if run.checkpoint else ""
                verb = (
                    f"SIGTERM: {code(run.script)} has no SIGTERM handler, so it cannot save a checkpoint now; "
                    f"it stops at once and keeps the checkpoints it already has{had}"
                )
            reply(svc, run, f"<@{self.actor.user_id}> is {self._doing()} {self.inst.label}. {verb}.", mention=False)
        ck_dir = (run.checkpoint_run_id or run_id) if run else run_id
        script = remote.stop_run(self.root, run_id, self.grace, force=self.force, checkpoint_run_id=ck_dir)
        if run is not None and run.nodes:  # a multi-node run: SIGTERM torchrun on every node at once
            out = multinode.signal_nodes(svc, run, script, self.grace + 60)
        else:
            out = svc.fleet.run(self.inst.id, script, timeout=self.grace + 60)
        parsed = parse_stop(out.stdout)
        if parsed is None:  # never "nothing was alive": the script did not say so
            raise self.unconfirmed(out, f"signal run `{run_id}`")
        result = parsed
        listing: CheckpointListing | None
        try:
            listing = discover(svc.fleet, self.root, self.inst.id, ck_dir)
        except RunctlError as exc:
            log.warning("checkpoint discovery on %s: %s", self.inst.id, exc.what)
            listing = None
        script_name = code(run.script) if run else f"run {code(run_id)}"
        halt = Halt(run_id, run, result, listing, "")
        halt.report = self.report(script_name, halt) + inventory(listing)
        if run is not None:
            self.close(run, halt)
        return halt

    def unconfirmed(self, result: ScriptResult, what: str) -> RunctlError:
        return unconfirmed(result, self.inst.label, self.inst.id, what)

    def _doing(self) -> str:
        return "terminating" if self.why == "terminate" else "stopping"

    def report(self, script: str, halt: Halt) -> str:
        now = self.svc.clock()
        result, saved, newest = halt.result, halt.saved, _newest(halt.listing)
        if result.how == "none":
            return f"Run {code(halt.run_id)}: no training process was alive any more."
        lost = (
            f"progress since epoch {newest.epoch} (the newest checkpoint, {code(newest.name)}, "
            f"{duration((now - newest.modified_at).total_seconds())} ago) is lost"
            if newest is not None and newest.epoch is not None
            else f"progress since {checkpoint_line(newest, now)} is lost"
            if newest is not None
            else "all its progress is lost: it has no checkpoint at all"
        )
        if halt.listing is None:
            lost = "runctl could not list its checkpoints to tell what was saved"
        kept = _already_saved(newest, result.finished_epoch)
        if self.force:
            if kept:
                return f":octagonal_sign: `--force`: {script} was killed at once (SIGKILL); {kept}."
            return (
                f":rotating_light: `--force`: {script} was killed at once (SIGKILL), without a chance to save; {lost}."
            )
        saved_text = f"saved {checkpoint_line(saved, now)}" if saved else ""
        if result.how == "kill":
            head = (
                f":rotating_light: *{script} did not exit within {self.grace} s of SIGTERM, so runctl "
                "killed it (SIGKILL).*"
            )
            if saved:
                return f"{head} Before that it {saved_text}; anything after that checkpoint is lost."
            if kept:
                return f"{head} Nothing is lost: {kept}. Make it exit promptly on SIGTERM."
            return (
                f"{head} It wrote no checkpoint after the signal; {lost}. Make it exit after saving on "
                "SIGTERM, or allow more time with `--grace SECONDS`."
            )
        if saved:
            return f":floppy_disk: {script} {saved_text} on SIGTERM and exited after {result.waited} s."
        if kept:
            return f":floppy_disk: {script} exited {result.waited} s after SIGTERM; {kept}."
        if self.sigterm.get(halt.run_id) == "default":
            return (
                f":rotating_light: *{script} has no SIGTERM handler, so it could not save a checkpoint when stopped.* "
                + (
                    f"Its newest checkpoint is {checkpoint_line(newest, now)}; progress after it is lost."
                    if newest is not None
                    else "It has no checkpoint at all: all its progress is lost."
                    if halt.listing is not None
                    else "runctl could not list its checkpoints to tell what it has."
                )
                + (
                    " To save on a stop, catch SIGTERM (`signal.signal(signal.SIGTERM, ...)`), write a checkpoint "
                    "to `$RUNCTL_CHECKPOINT_DIR`, then exit."
                )
            )
        return (
            f":rotating_light: *{script} wrote no checkpoint on SIGTERM; {lost}.* It has no SIGTERM "
            "handler that saves: catch SIGTERM (`signal.signal(signal.SIGTERM, ...)`), write a checkpoint "
            "to `$RUNCTL_CHECKPOINT_DIR`, then exit."
        )

    def close(self, run: Run, halt: Halt) -> None:
        """The run ended here: record it, release its lock, close its parent message."""
        svc = self.svc
        found = halt.saved or _newest(halt.listing)
        if found is not None and not found.is_dir:
            run.checkpoint = Checkpoint(
                name=found.name, size=found.size, modified_at=found.modified_at, epoch=found.epoch
            )
        run.state = RunState.STOPPED
        run.ended_by = "force" if self.force else self.why
        run.ended_at = svc.clock()
        if halt.result.how == "kill":
            run.exit_code = 137
        run.stopped_by = self.actor.user_id  # the final parent says who, in the past tense
        for iid in run.node_ids:
            release_train_lock(svc, iid, run.run_id)
        # What the end of a run says (cost, metrics, chart, links), read before the instance stops or goes.
        told = summary.gather(svc, run, summary.HALT_TIMEOUT)
        summary.keep(run, told)
        publish(svc, run)
        reply(svc, run, halt.report + told.more(), full_log=run.started_at is not None)
        summary.conclude(svc, run, told)


def inventory(listing: CheckpointListing | None) -> str:
    """How many checkpoints the run has in all, wherever it saved them."""
    if listing is None or not listing.checkpoints:
        return ""
    n = len(listing.checkpoints) + listing.omitted
    shown = " shown" if listing.omitted else ""
    return f" The run has {n} checkpoint{'s' if n != 1 else ''} ({size(listing.total_size)}{shown})."


def release_train_lock(svc: Services, instance_id: str, run_id: str) -> None:
    lock = train_lock(svc.redis, instance_id)
    held = lock.holder()
    raw = lock.raw()
    if held is not None and held.run_id == run_id and raw is not None:
        lock.release(raw)
