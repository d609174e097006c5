"""The train flow: check, lock, ship, launch, confirm, then hand over to the monitor."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import timedelta

from workers import remote
from workers.aws import backups
from workers.aws.backups import Stored
from workers.aws.fleet import PRESIGN_MARGIN_SECONDS
from workers.aws.instance import PYTHON_TAG, Instance, ScriptResult
from workers.commands import TrainCommand
from workers.errors import RunConflict, RunctlError
from workers.jobs import envsetup, funnel, multinode
from workers.jobs.backup import url_seconds
from workers.jobs.funnel import Job
from workers.jobs.halt import unconfirmed
from workers.jobs.preflight import Refusals, require_running
from workers.remote import backup as backup_script
from workers.remote.checkpoints import discover
from workers.remote.events import OFF, Sender, sender
from workers.remote.lifecycle import parse_stop
from workers.settings import python_path
from workers.slack.escape import code, escape
from workers.slack.format import size
from workers.slack.thread import open_run, publish, reply
from workers.state import event_keys, records
from workers.state.locks import Holder, operation, train_lock
from workers.state.polls import schedule
from workers.state.runs import DIR_OPTIONS, Run, RunMeta, RunState, new_run, option_values

log = logging.getLogger(__name__)

DELIVER_SECONDS = 600  # the deliver command's delivery timeout, and its execution timeout

_DECLARES_INTERVAL = re.compile(r"""["']--checkpoint[-_]interval["']""")
_DECLARES_DIR = re.compile(r"""["']--checkpoint[-_]dir["']""")
_CHECKPOINT_SIGNS = re.compile(r"checkpoint|RUNCTL_CHECKPOINT_DIR|torch\.save|save_pretrained|\.ckpt", re.IGNORECASE)


@funnel.command(TrainCommand)
def train(job: Job, cmd: TrainCommand, run_id: str) -> str:
    svc = job.svc
    job.run = svc.runs.get(run_id) or svc.runs.create(new_run(svc, cmd, job.actor, run_id))
    return execute(job, cmd).state.value


def execute(job: Job, cmd: TrainCommand) -> Run:
    """The train flow for `job.run`: across its nodes on torchrun, or on its one instance."""
    flow = TrainFlow(job, cmd)
    return multinode.execute(flow, cmd) if cmd.nodes else flow.execute()


class TrainFlow:
    def __init__(self, job: Job, cmd: TrainCommand) -> None:
        assert job.run is not None
        self.job = job
        self.svc = job.svc
        self.cmd = cmd
        self.run = job.run
        self.root = job.svc.settings.RUNCTL_REMOTE_ROOT
        self.token: str | None = None
        self.restoring: list[Stored] = []  # what restore_body fetches from S3, by index
        self.restore_output = ""  # what the restore commands before the launch's said

    def execute(self) -> Run:
        run = self.run
        run.state = RunState.STARTING
        try:
            # Pre-flight: the code, the instance, the lock. A failure here is told to the
            # requester alone (no parent message yet: the channel sees runs, not typos).
            source = self.check_code()
            # The operation lock keeps a stop, start or terminate of this instance from
            # interleaving with the launch (a stop could power off under a fresh run).
            doing = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=self.svc.clock())
            with operation(self.svc.redis, run.instance_id, doing):
                # The instance before the lock: a run refused here never held it, so it never owned the instance.
                inst = self.check_instance()
                other = self.claim()
                self.run.instance_name = inst.name
                self.run.python = self.interpreter(inst)
                # Passed: the one public parent, before anything touches the instance
                # (a channel that refuses the bot: say so privately, start nothing).
                open_run(self.svc, run)
                if self.token is None:
                    self.take_over(other)
                self.plan_checkpoints(source)
                url = self.bundle_url()
                reqs = envsetup.requirements(self.svc, run)
                if reqs is None:  # the usual case: one SSM command checks, ships and starts
                    self.deliver(url, self.restore_body() + self.launch_body(run.python))
                else:
                    self.deliver(url, "")
                    self.start(self.restore_body() + self.launch_body(envsetup.build(self.svc, run, reqs)))
                self.confirm_started()
        except RunctlError:
            started = run.started_at is not None or run.state is RunState.SETTING_UP
            self.job.failed_state = RunState.FAILED if started else RunState.REFUSED
            raise
        finally:
            self.release()  # the funnel tells the run's thread what went wrong
        return run

    # --- steps -----------------------------------------------------------
    def check_code(self) -> str | None:
        """Resolve the ref and check the script, before anything reaches the instance."""
        if not self.run.sync_code:
            self.run.notes.append(":information_source: `--no-sync-code`: running the tree already on the instance.")
            return None
        repo = self.svc.repo
        repo.sync()
        self.run.sha = repo.resolve(self.run.ref)
        data = repo.check_script(self.run.sha, self.run.ref, self.run.script)
        return data.decode(errors="replace")

    def check_instance(self) -> Instance:
        fleet = self.svc.fleet
        iid = self.run.instance_id
        inst = fleet.get(iid)
        require_running(
            inst,
            Refusals(
                stopped=".",
                stopped_why="A training needs a running instance.",
                stopped_fix=f"/runctl start {iid}",
                gone="; it cannot run anything again.",
                gone_fix="/runctl resources",
            ),
            wait_pending=True,
        )
        if inst.state == "pending":
            reply(self.svc, self.run, f"{inst.label} is starting; waiting for it.", mention=False)
            inst = fleet.wait_for_state(iid, ("running",), self.svc.settings.RUNCTL_PENDING_WAIT_SECONDS)
        fleet.require_agent(inst, "runs commands")
        self.run.spot = inst.lifecycle == "spot"
        return inst

    def interpreter(self, inst: Instance) -> str:
        """The instance's `runctl:python` tag, else RUNCTL_PYTHON: on a Deep Learning AMI the
        agent's `python3` is not the one with torch and CUDA."""
        tagged = inst.tags.get(PYTHON_TAG)
        if tagged is None:
            return self.svc.settings.RUNCTL_PYTHON
        try:
            return python_path(tagged.strip())
        except ValueError:
            raise RunctlError(
                f"{inst.label} has an unusable `{PYTHON_TAG}` tag.",
                why="It must be an absolute path (or a command name on the SSM agent's PATH) "
                "of letters, digits and `._+-/`.",
                fix=f"aws ec2 create-tags --resources {inst.id} --tags "
                f"Key={PYTHON_TAG},Value=/opt/conda/envs/pytorch/bin/python",
            ) from None

    def claim(self) -> Holder | None:
        """Take the train lock, or refuse at once while another run holds it; with `--force`,
        the holder to stop once the operation lock is held (the lock is then taken over)."""
        run = self.run
        holder = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=self.svc.clock())
        lock = train_lock(self.svc.redis, run.instance_id)
        token = holder.token()
        if lock.acquire(token):
            self.token = token
            run.lock_token = token
            self.svc.runs.save(run)  # live from here: stop, start and terminate see it and its owner
            return None
        other = lock.holder()
        if not self.cmd.force:
            raise conflict(run.instance_id, other.run_id if other else "?", other, "Redis lock")
        return other

    def take_over(self, other: Holder | None) -> None:
        run = self.run
        lock = train_lock(self.svc.redis, run.instance_id)
        token = Holder(run_id=run.run_id, user_id=run.user_id, script=run.script, since=self.svc.clock()).token()
        if other:
            self.stop_previous(other.run_id)
        self.svc.redis.set(lock.key, token, px=lock.ttl_ms)
        self.token = token
        run.lock_token = token
        self.svc.runs.save(run)

    def deliver(self, bundle_url: str | None, launch: str) -> None:
        """Ship the code (and start the run, given its launch script) in one SSM command,
        unless the instance says another training is alive: Redis may have lost the lock,
        the instance's pid files are the truth."""
        run, fleet = self.run, self.svc.fleet
        script = remote.deliver(self.root, run.run_id, run.script, bundle_url, launch)
        result = fleet.run(run.instance_id, script, DELIVER_SECONDS)
        if result.exit_code == remote.BUSY_EXIT:
            live = [p for p in (line.split() for line in result.stdout.splitlines()) if len(p) == 3 and p[0] == "live"]
            if not self.cmd.force:
                other_run = self.svc.runs.get(live[0][1]) if live else None
                holder = (
                    Holder(
                        run_id=other_run.run_id,
                        user_id=other_run.user_id,
                        script=other_run.script,
                        since=other_run.started_at or other_run.created_at,
                    )
                    if other_run
                    else None
                )
                other_id, pid = (live[0][1], live[0][2]) if live else ("?", "?")
                raise conflict(run.instance_id, other_id, holder, f"pid {pid}")
            for _, other_id, _ in live:
                self.stop_previous(other_id)
            # Stopping took time: sign a fresh URL for the second command.
            script = remote.deliver(self.root, run.run_id, run.script, self.bundle_url(), launch)
            result = fleet.run(run.instance_id, script, DELIVER_SECONDS)
        if not result.ok:
            raise launch_error(run, result.exit_code, result.stderr or result.stdout, self.restoring, result)
        if launch:
            self.restored(result.stdout)
            self.mark_started()

    def start(self, launch: str) -> None:
        result = self.svc.fleet.run(self.run.instance_id, remote.header(self.root) + launch, timeout=600)
        if not result.ok:
            raise launch_error(self.run, result.exit_code, result.stderr or result.stdout, self.restoring, result)
        self.restored(result.stdout)
        self.mark_started()

    def stop_previous(self, other_run_id: str) -> None:
        grace = self.svc.settings.RUNCTL_STOP_GRACE_SECONDS
        reply(
            self.svc,
            self.run,
            f"`--force`: stopping run `{other_run_id}` gracefully (SIGTERM, up to {grace} s).",
            mention=False,
        )
        res = self.svc.fleet.run(self.run.instance_id, remote.stop_run(self.root, other_run_id, grace), grace + 60)
        outcome = parse_stop(res.stdout)
        if outcome is None:  # undelivered or unfinished: the other run may well be alive
            raise unconfirmed(res, self.run.instance_id, self.run.instance_id, f"stop run `{other_run_id}`")
        if outcome.how == "none":
            how = "it had already exited"
        elif outcome.how == "kill":
            how = f"SIGKILL after {outcome.waited} s; it ignored SIGTERM"
        else:
            how = f"exited {outcome.waited} s after SIGTERM"
            how += f", saved {code(outcome.saved[-1])}" if outcome.saved else ""
        other = self.svc.runs.get(other_run_id)
        if outcome.how != "none" and not outcome.saved:
            how += self.kept_checkpoint(other.checkpoint_run_id if other else None, other_run_id)
        self.run.notes.append(f":octagonal_sign: `--force` stopped run `{other_run_id}` ({how}).")
        if other and not other.state.ended:
            other.state = RunState.STOPPED
            other.ended_by = "force"
            other.ended_at = self.svc.clock()
            publish(self.svc, other)
            by = "your" if other.user_id == self.run.user_id else f"<@{self.run.user_id}>'s"
            reply(self.svc, other, f"this run was stopped with `--force` for {by} run `{self.run.run_id}`.")

    def kept_checkpoint(self, checkpoint_run_id: str | None, run_id: str) -> str:
        """What a run stopped with no checkpoint saved on the signal still has: its newest one
        (saved before the signal), or none at all."""
        try:
            listing = discover(self.svc.fleet, self.root, self.run.instance_id, checkpoint_run_id or run_id)
        except RunctlError as exc:
            log.warning("checkpoints of %s: %s", run_id, exc.what)
            return "; runctl could not list its checkpoints"
        newest = listing.newest_valid or listing.newest
        if newest is None:
            return "; it has no checkpoint"
        epoch = f", epoch {newest.epoch}" if newest.epoch is not None else ""
        return f"; nothing saved on the signal, its newest checkpoint is {code(newest.name)}{epoch}"

    def plan_checkpoints(self, source: str | None) -> None:
        run = self.run
        if run.backup and not any("`--backup`" in n for n in run.notes):
            run.notes.append(
                ":cloud: `--backup`: each new checkpoint is copied to S3 as it appears (each file once by sha256)."
            )
        if source is None:
            return
        passed = any(a == "--checkpoint-interval" or a.startswith("--checkpoint-interval=") for a in run.args)
        if _DECLARES_INTERVAL.search(source) and not passed:
            interval = run.checkpoint_interval or 1
            run.args = (*run.args, "--checkpoint-interval", str(interval))
            run.notes.append(
                f":floppy_disk: Passed your `--checkpoint-interval {interval}` on to the script, which accepts it."
                if run.checkpoint_interval
                else ":floppy_disk: Added `--checkpoint-interval 1` (runctl's default): the script accepts it "
                "and you set no interval."
            )
        elif not _CHECKPOINT_SIGNS.search(source):
            self.warn_no_checkpoints()
        if _DECLARES_DIR.search(source) and not option_values(run.args, DIR_OPTIONS[:2]):
            run.pass_checkpoint_dir = True
            run.notes.append(
                ":floppy_disk: Added `--checkpoint-dir $RUNCTL_CHECKPOINT_DIR`: the script accepts it and you "
                "set none, so its checkpoints are where runctl lists, backs up and resumes them."
            )

    def warn_no_checkpoints(self) -> None:
        self.run.notes.append(
            f":warning: {code(self.run.script)} shows no sign of checkpointing; a stop or interruption "
            "will lose its progress. Save to `$RUNCTL_CHECKPOINT_DIR` to be safe."
        )

    def bundle_url(self) -> str | None:
        """Upload the `git archive` once per commit; instances fetch it through a presigned URL."""
        run, fleet = self.run, self.svc.fleet
        if not run.sync_code:
            return None
        key = f"runctl/bundles/{run.sha}.tar.gz"
        if not fleet.has_object(key):
            fleet.upload(key, self.svc.repo.archive(run.sha))
        # SSM may hold the command DELIVER_SECONDS before it starts, then the script may
        # run DELIVER_SECONDS: the URL outlives both.
        return fleet.presign(key, 2 * DELIVER_SECONDS + PRESIGN_MARGIN_SECONDS)

    def restore_body(self) -> str:
        """For a resumed run with an S3 backup: fetch the files this disk lacks (presigned GETs,
        valid for the command's delivery and execution timeouts), each sha256-verified
        before it takes its place; the launch follows only if all were. Only files Redis binds
        to the run and the instance they came from, and only into its checkpoint directory."""
        run = self.run
        self.restoring, self.restore_output = [], ""
        if not run.restore_from:
            return ""
        found = backups.restorable(backups.load(self.svc.fleet, run.restore_from), run.restore_from, self.svc.runs.get)
        self.run.notes += restore_notes(run.restore_from, found)
        self.restoring = found.files
        if not self.restoring:
            return ""
        seconds = url_seconds(DELIVER_SECONDS)

        def signed(files: list[tuple[int, Stored]]) -> list[backup_script.Download]:
            presign = self.svc.fleet.presign
            return [backup_script.Download(i, f.name, f.sha256, presign(f.key, seconds), f.mtime) for i, f in files]

        # Every URL in one command could pass SSM's 64 KB: batches, each signed as it is sent.
        batches = backup_script.restore_batches(run.restore_from, signed(list(enumerate(self.restoring))))
        for batch in batches[:-1]:
            again = signed([(d.index, self.restoring[d.index]) for d in batch])
            body = remote.header(self.root) + backup_script.restore_only(self.root, run.restore_from, again)
            result = self.svc.fleet.run(run.instance_id, body, DELIVER_SECONDS)
            self.restore_output += result.stdout
            if not result.ok:
                raise launch_error(run, result.exit_code, result.stderr or result.stdout, self.restoring, result)
        last = signed([(d.index, self.restoring[d.index]) for d in batches[-1]])
        return backup_script.restore(self.root, run.restore_from, last)

    def restored(self, output: str) -> None:
        if not self.restoring:
            return
        got = backup_script.parse_records(self.restore_output + output, "got")
        fetched = [f for i, f in enumerate(self.restoring) if got.get(i, ("", ""))[0] == "ok"]
        had = sum(1 for i in range(len(self.restoring)) if got.get(i, ("", ""))[0] == "have")
        self.run.notes.append(
            f":inbox_tray: Restored {len(fetched)} file{'s' if len(fetched) != 1 else ''} "
            f"({size(sum(f.size for f in fetched))}) from S3, sha256 verified"
            + (f"; {had} already on this disk" if had else "")
            + "."
        )

    def launch_body(self, python: str, launcher: Sequence[str] = ()) -> str:
        """`launcher`: words before the script (a multi-node run's torchrun, workers/remote/torchrun.py)."""
        run = self.run
        env = {
            "RUNCTL_RUN_ID": run.run_id,
            "RUNCTL_CHECKPOINT_INTERVAL": str(run.checkpoint_interval or 1),
            "PYTHONUNBUFFERED": "1",
        }
        meta = records.signed_meta(records.record_key(self.svc.settings), RunMeta.of(run, self.svc.clock()))
        return remote.launch_body(
            run.run_id,
            run.script,
            run.args,
            env,
            meta,
            python=python,
            checkpoint_run_id=run.checkpoint_run_id,
            events=self.events(python),
            pass_checkpoint_dir=run.pass_checkpoint_dir,
            checkpoint_dirs=option_values(run.args, DIR_OPTIONS),
            spot_watch=run.spot,
            launcher=launcher,
        )

    def events(self, python: str) -> Sender:
        """With RUNCTL_EVENTS_URL set, the wrapper reports the run's end (and progress) at once."""
        settings = self.svc.settings
        if not settings.RUNCTL_EVENTS_URL:
            return OFF
        key = event_keys.issue(self.svc.redis, self.run.run_id)
        return sender(settings.RUNCTL_EVENTS_URL, key, self.run.run_id, python, settings.RUNCTL_EVENTS_PROGRESS_SECONDS)

    def mark_started(self) -> None:
        self.run.started_at = self.svc.clock()
        self.run.state = RunState.RUNNING
        publish(self.svc, self.run)

    def confirm_started(self) -> None:
        """The monitor's first poll, about 2 s after the launch, confirms the process is
        alive or reports its exit code and log tail. Scheduling it, rather than sleeping
        here, frees this worker for the next command at once."""
        run = self.run
        if not run.wait:
            reply(
                self.svc,
                run,
                f"run `{run.run_id}` started (`--no-wait`: no progress updates here). "
                f"`/runctl status {run.instance_id}` shows it.",
            )
        schedule(self.svc, run.run_id, timedelta(seconds=self.svc.settings.RUNCTL_LAUNCH_CHECK_SECONDS))
        self.token = None  # the monitor owns the lock from here

    def release(self) -> None:
        if self.token:
            train_lock(self.svc.redis, self.run.instance_id).release(self.token)
            self.token = None


def conflict(instance_id: str, run_id: str, holder: Holder | None, evidence: str) -> RunConflict:
    busy = (
        f"<@{holder.user_id}> is training {code(holder.script)} (run `{run_id}`) since "
        f"<!date^{int(holder.since.timestamp())}^{{date_short_pretty}} {{time}}|{holder.since:%Y-%m-%d %H:%M} UTC>"
        if holder
        else f"A training process (run `{run_id}`) is alive"
    )
    return RunConflict(
        f"{instance_id} is busy: {busy}.",
        why=f"One training per instance (seen via {evidence}).",
        fix=f"add `--queue` to start yours when it ends; `/runctl stop {instance_id}` to checkpoint and stop it; "
        "or add `--force` to stop it gracefully and start yours.",
    )


def restore_notes(owner: str, found: backups.Restorable) -> list[str]:
    """What of the S3 backup a restore leaves out, and why, for the run's thread."""
    notes = []
    if found.foreign:
        shown = "; ".join(f"{code(f.name)}: {escape(why)}" for f, why in found.foreign[:5])
        more = f" and {len(found.foreign) - 5} more" if len(found.foreign) > 5 else ""
        notes.append(
            f":no_entry: Not restored from S3: {len(found.foreign)} file{'s' if len(found.foreign) != 1 else ''} "
            f"under run {code(owner)}'s backup that runctl's records do not bind to it and its instance "
            f"({shown}{more}). A backup from the run's own instance replaces them."
        )
    if found.outside:
        notes.append(
            f":information_source: {len(found.outside)} backed-up file{'s' if len(found.outside) != 1 else ''} "
            f"saved outside the checkpoint directory stay{'s' if len(found.outside) == 1 else ''} in S3 only "
            f"(`s3://…/{backups.PREFIX}{escape(owner)}/`): a restore writes only into the checkpoint directory."
        )
    return notes


def launch_error(
    run: Run, exit_code: int, output: str, restoring: list[Stored] | None = None, result: ScriptResult | None = None
) -> RunctlError:
    if exit_code == backup_script.RESTORE_FAILED and restoring:
        output = f"{result.stdout}\n{result.stderr}" if result else output  # records on stdout, the reason on stderr
        got = backup_script.parse_records(output, "got")
        words = {"sha": "sha256 mismatch", "dir": "a directory has its name", "mkdir": "could not write"}
        bad = [
            f"{code(f.name)} ({words.get(got[i][0], 'HTTP ' + got[i][0])})"
            for i, f in enumerate(restoring)
            if i in got and got[i][0] not in ("ok", "have")
        ]
        prefix = "runctl: could not restore the checkpoints from S3: "
        said = next((line[len(prefix) :] for line in output.splitlines() if line.startswith(prefix)), "")
        return RunctlError(
            f"{run.instance_id} could not restore run {code(run.restore_from or '')}'s checkpoints from S3; "
            "training was not started.",
            why=("Not restored: " + ", ".join(bad[:10]) + ".")
            if bad
            else escape(said[:300])
            if said
            else "The instance has no curl.",
            fix="Check that the instance reaches S3 (HTTPS to the bucket's region), then resume again."
            if bad or not said
            else f"Look at what stands at the run's checkpoint directory on {run.instance_id} "
            "(anyone who trains there is root), move it away, then resume again.",
        )
    if exit_code == 3:
        return RunctlError(
            f"{code(run.script)} is not on {run.instance_id}.",
            why="`--no-sync-code` runs the tree already on the instance, and it has no such file.",
            fix=f"Run without `--no-sync-code` to ship the code at {code(run.ref)}.",
        )
    said = next((line for line in output.splitlines() if line.startswith("runctl: could not")), "")
    if exit_code in (remote.DOWNLOAD_FAILED, remote.UNPACK_FAILED) and said:
        step = "download" if exit_code == remote.DOWNLOAD_FAILED else "unpack"
        return RunctlError(
            f"{run.instance_id} could not {step} the code bundle; training was not started.",
            why=escape(said.removeprefix("runctl: ")[:600]),
            fix="Check that the instance reaches S3 (HTTPS to the bucket's region, a proxy or "
            f"VPC endpoint if it has no internet), then run the same command again: {code(run.command_text)}.",
        )
    return RunctlError(
        f"Launching on {run.instance_id} failed (exit {exit_code}).",
        detail=output.strip()[-1500:],
        fix=f"/runctl status {run.instance_id}",
    )
