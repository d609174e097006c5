"""Checkpoints to S3: `/runctl backup <instance-id> [--run RUN_ID]`, and `backup_runs`,
the flow terminate runs first. Instances have no AWS credentials: the worker hashes the
files through SSM, presigns one PUT URL per file not yet in S3 with that sha256, the
instance uploads with curl, and the worker checks each object and writes the manifest.
The URLs live only in the SSM command; they are never logged or posted.

Only a run's own instance writes its backup (`writer`): the run must be in Redis, and per
Redis it (or a run resumed from it) ran on that instance; a person asking must be the run's
owner or an admin. What the instance says (its run directories, its `checkpoint_dirs`) is
never the authority: the places backed up come from the bot's run record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workers import policy
from workers.aws import backups
from workers.aws.backups import RunBackup, Stored
from workers.aws.fleet import PRESIGN_MARGIN_SECONDS
from workers.aws.instance import Instance
from workers.commands import BackupCommand
from workers.errors import PermissionDenied, RemoteError, RunctlError
from workers.jobs import funnel
from workers.jobs.checkpoints import reachable
from workers.jobs.funnel import Job
from workers.queueing import SYSTEM, JobPath, RunArgs, enqueue
from workers.remote import backup as script
from workers.remote.checkpoints import DISCOVERY_TIMEOUT, discover_all
from workers.services import Services, current
from workers.slack.escape import code, escape
from workers.slack.format import size
from workers.slack.thread import reply
from workers.state.runs import DIR_OPTIONS, HISTORY, Run, option_values

log = logging.getLogger(__name__)

UPLOAD_BYTES_PER_SECOND = 20_000_000  # what the upload command's timeout allows for
UPLOAD_BASE_SECONDS = 300
UPLOAD_MAX_SECONDS = 6 * 3600
MAX_PASSES = 20


@dataclass
class RunOutcome:
    run_id: str
    uploaded: list[Stored] = field(default_factory=list)
    already: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    failed: list[tuple[str, str]] = field(default_factory=list)
    subdirs: list[str] = field(default_factory=list)
    stored: RunBackup | None = None
    denied: str = ""  # Slack text: why runctl backs up none of this run from this instance

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed and not self.denied


@dataclass
class BackupOutcome:
    runs: list[RunOutcome]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def text(self, bucket: str) -> str:
        if not self.runs:
            return "no run on it has checkpoints, so there was nothing to back up."
        lines = []
        for r in self.runs:
            if r.denied:
                lines.append(f":no_entry: run {code(r.run_id)} was not backed up: {r.denied}")
                continue
            where = f"`s3://{escape(bucket)}/{backups.PREFIX}{escape(r.run_id)}/`"
            sent = sum(s.size for s in r.uploaded)
            head = (
                f"run {code(r.run_id)}: uploaded {len(r.uploaded)} file{'s' if len(r.uploaded) != 1 else ''} "
                f"({size(sent)}) to {where}"
            )
            if r.already:
                head += f"; {r.already} already there with the same sha256"
            lines.append(head + ".")
            lines += [f":no_entry: {code(n)} not backed up: {escape(why)}" for n, why in r.refused + r.failed]
            if r.subdirs:
                shown = ", ".join(code(d) for d in r.subdirs[:5])
                lines.append(f":information_source: Directories are not backed up: {shown}.")
        return "\n".join(lines)


PENDING = "runctl:backup:pending:"  # one queued `--backup` job per run at a time


def queue_run(svc: Services, run: Run) -> None:
    """`train --backup`: back up what is new; at most one job waits per run (it clears the
    mark when it starts, so a checkpoint written during an upload queues the next one)."""
    if svc.redis.set(PENDING + run.run_id, "1", nx=True, ex=2 * UPLOAD_MAX_SECONDS):
        enqueue(svc.queue, JobPath.BACKUP_NEW, RunArgs(run_id=run.run_id), SYSTEM)


@funnel.system("backup of a run's new checkpoints")
def backup_new(run_id: str) -> str:
    svc = current()
    svc.redis.delete(PENDING + run_id)
    run = svc.runs.get(run_id)
    if run is None:
        return "no such run"
    inst = svc.fleet.get(run.instance_id)
    if inst.state != "running":
        return f"{inst.id} is {inst.state}"
    out = backup_run(svc, inst, run.checkpoint_run_id or run.run_id, run.user_id)
    if not out.ok:
        warned = {n for n, _ in out.refused + out.failed}
        key = f"runctl:backup:warned:{run_id}"
        fresh = [n for n in sorted(warned) if svc.redis.sadd(key, n)]
        svc.redis.expire(key, 7 * 86400)
        if fresh:
            why = BackupOutcome([out]).text(svc.settings.RUNCTL_S3_BUCKET or "")
            reply(svc, run, f":warning: `--backup`: {why}", mention=False)
    return f"{len(out.uploaded)} uploaded, {out.already} already in S3"


def upload_seconds(total_bytes: int) -> int:
    """The upload command's timeout: a base plus what the bytes take at a modest rate."""
    return min(UPLOAD_MAX_SECONDS, UPLOAD_BASE_SECONDS + total_bytes // UPLOAD_BYTES_PER_SECOND)


def url_seconds(timeout: int) -> int:
    """SSM may hold a command up to its timeout before it starts, then run it as long:
    the URLs outlive both by a minute, and no more."""
    return 2 * timeout + PRESIGN_MARGIN_SECONDS


@funnel.command(BackupCommand)
def backup(job: Job, cmd: BackupCommand) -> str:
    svc = job.svc
    inst = reachable(svc, cmd.instance_id)
    if cmd.run_id is not None:
        writer(svc, inst, cmd.run_id, job.actor.user_id)  # refused before anything is read or sent
        run_ids = [cmd.run_id]
    else:
        run_ids = [
            ls.run_id
            for ls in discover_all(svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, inst.id)
            if ls.run_id and ls.checkpoints
        ]
    outcome = backup_runs(svc, inst, run_ids, job.actor.user_id)
    mark = ":white_check_mark:" if outcome.ok else ":warning:"
    text = f"{mark} Backup of {inst.label}: {outcome.text(svc.settings.RUNCTL_S3_BUCKET or '')}"
    job.tell(text)
    return text.splitlines()[0]


def backup_runs(svc: Services, inst: Instance, run_ids: list[str], user_id: str | None = None) -> BackupOutcome:
    return BackupOutcome([backup_run(svc, inst, rid, user_id) for rid in run_ids])


def writer(svc: Services, inst: Instance, run_id: str, user_id: str | None) -> Run:
    """The run that, per Redis, saves run `run_id`'s checkpoints on `inst` (the run itself, or
    the newest run resumed from it there); `user_id` (None: the run's own flows) must be the
    owner of the run whose checkpoints they are, or an admin. Raises RunctlError otherwise."""
    rec = svc.runs.get(run_id)
    owner_id = (rec.checkpoint_run_id or rec.run_id) if rec else run_id
    owner = rec if rec is not None and owner_id == rec.run_id else svc.runs.get(owner_id)
    if rec is None or owner is None:
        raise RunctlError(
            f"Run {code(owner_id if rec else run_id)} is not known to runctl, so nothing of it was backed up.",
            why="Backups are only of runs runctl started and recorded (in Redis), from the instance they ran on; "
            "a run directory on an instance proves nothing about whose it is.",
            fix=f"`/runctl checkpoints {inst.id}` lists the runs on it; back up one of yours: "
            f"`/runctl backup {inst.id} --run <run-id>`.",
        )
    found = (
        rec
        if rec.instance_id == inst.id
        else next(
            (r for r in svc.runs.history(inst.id, HISTORY) if (r.checkpoint_run_id or r.run_id) == owner_id), None
        )
    )
    if found is None:
        raise RunctlError(
            f"Run {code(run_id)} did not run on {inst.label}, so its checkpoints are not backed up from there.",
            why=f"Per runctl's records it ran on `{escape(rec.instance_id)}`; a run's S3 backup, which its "
            "resume restores, is written only from its own instance.",
            fix=f"/runctl backup {rec.instance_id} --run {run_id}",
        )
    if user_id is not None and user_id != owner.user_id and not policy.is_admin(svc.settings, user_id):
        raise PermissionDenied(
            f"You can't back up run {code(owner_id)}: its checkpoints are <@{owner.user_id}>'s.",
            why="Its S3 backup is what resuming it restores, so only its owner or an admin writes it.",
            fix=f"Ask <@{owner.user_id}> or an admin to run `/runctl backup {inst.id} --run {owner_id}`.",
        )
    return found


def backup_run(svc: Services, inst: Instance, run_id: str, user_id: str | None = None) -> RunOutcome:
    """Upload what of the run is not in S3 yet (by name and sha256), then the manifest; in
    passes of at most `script.MAX_FILES` files, newest first, each leaving out what S3 holds.
    Only from the run's own instance, for its owner or an admin (`writer`); `user_id` None:
    on the run's own behalf (its `--backup`, a terminate or spot interruption saving it)."""
    try:
        saver = writer(svc, inst, run_id, user_id)
    except RunctlError as exc:
        return RunOutcome(run_id, denied=exc.what)
    run_id = saver.checkpoint_run_id or saver.run_id
    out = RunOutcome(run_id)
    # What Redis does not bind to this run and its instance is not counted as backed up.
    stored = backups.load_bound(svc.fleet, run_id, svc.runs.get) or RunBackup(run_id=run_id, instance_id=inst.id)
    handled: list[tuple[int, int, str]] = []  # seen by this backup's passes: the next ones leave them out
    for first in [True] + [False] * (MAX_PASSES - 1):
        if not _pass(svc, inst, saver, stored, out, handled, first):
            break
    else:
        out.failed.append(
            ("…", f"more files than {MAX_PASSES} passes of {script.MAX_FILES} hold; run the backup again")
        )
    _verify(svc, inst, stored, out)
    out.stored = stored
    out.refused = list(dict.fromkeys(out.refused))  # a refused file is seen again by every pass
    out.failed = list(dict.fromkeys(out.failed))
    log.info(
        "backup of %s on %s: %d uploaded, %d already, %d refused, %d failed",
        run_id,
        inst.id,
        len(out.uploaded),
        out.already,
        len(out.refused),
        len(out.failed),
    )
    return out


def _pass(
    svc: Services,
    inst: Instance,
    saver: Run,
    stored: RunBackup,
    out: RunOutcome,
    handled: list[tuple[int, int, str]],
    first: bool,
) -> bool:
    """One pass; True when files were left for the next one. A listing cut short is an error:
    the files it did not show would be missing from a backup that said it was done."""
    fleet, root = svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT
    run_id = stored.run_id
    known = handled + [(f.size, f.mtime, f.name) for f in stored.files]
    dirs = saved_in(svc, saver)
    prefixes = [prefix for _, prefix in script.places(run_id, dirs)]
    listed = fleet.run(inst.id, script.sums(root, run_id, known, dirs), timeout=DISCOVERY_TIMEOUT)
    sums = script.parse_sums(listed.stdout)
    if not listed.ok or not sums.complete:
        why = f"{listed.status}, exit {listed.exit_code}" if not listed.ok else "its listing was cut short"
        raise RemoteError(
            f"Hashing the checkpoints of run {code(run_id)} on {inst.label} failed ({why}), "
            "so the backup is not complete.",
            fix=f"/runctl status {inst.id}",
        )
    files = [f for f in sums.files if script.listed_under(f.name, prefixes)]
    out.subdirs = out.subdirs or sums.subdirs
    if first:
        out.already = sums.known  # what S3 held as it is here before this backup
    handled += [(f.size, f.mtime, f.name) for f in sums.files]
    todo: list[script.Sum] = []
    for f in files:
        if stored.has(f.name, f.sha256):
            out.already += 1
        elif f.size > script.SINGLE_PUT_LIMIT:
            out.refused.append(
                (
                    f.name,
                    f"{size(f.size)} is above S3's 5 GB limit for one upload "
                    "(multipart uploads are not supported yet); copy it yourself",
                )
            )
        elif not f.sha256:
            out.failed.append((f.name, "it could not be read on the instance"))
        else:
            todo.append(f)
    for batch in _batches(svc, run_id, todo):
        _upload(svc, inst, saver, stored, out, batch)
    if sums.more and not sums.files:
        out.failed.append(("…", f"{sums.more} files could not be listed on the instance; run the backup again"))
        return False
    return sums.more > 0


def _batches(svc: Services, run_id: str, todo: list[script.Sum]) -> list[list[script.Sum]]:
    """The files in upload commands that each stay under SSM's size limit (script.COMMAND_LIMIT);
    sized with URLs as long as the real ones (the longest expiry, the same credentials)."""
    root, seconds = svc.settings.RUNCTL_REMOTE_ROOT, url_seconds(upload_seconds(sum(f.size for f in todo)))
    batches: list[list[script.Sum]] = []
    uploads: list[script.Upload] = []
    for i, f in enumerate(todo):
        url = svc.fleet.presign(backups.object_key(run_id, script.s3_suffix(f.name)), seconds, "put_object")
        uploads.append(script.Upload(i, f.name, f.sha256, url))
        if len(uploads) > 1 and script.command_size(script.upload(root, run_id, uploads)) > script.COMMAND_LIMIT:
            batches.append([todo[u.index] for u in uploads[:-1]])
            uploads = uploads[-1:]
    if uploads:
        batches.append([todo[u.index] for u in uploads])
    return batches


def _upload(
    svc: Services, inst: Instance, saver: Run, stored: RunBackup, out: RunOutcome, todo: list[script.Sum]
) -> None:
    """One upload command: URLs presigned as it is sent, each object checked (HeadObject)."""
    fleet, root, run_id = svc.fleet, svc.settings.RUNCTL_REMOTE_ROOT, stored.run_id
    before = len(out.uploaded)
    timeout = upload_seconds(sum(f.size for f in todo))
    keys = {i: backups.object_key(run_id, script.s3_suffix(f.name)) for i, f in enumerate(todo)}
    uploads = [
        script.Upload(i, f.name, f.sha256, fleet.presign(keys[i], url_seconds(timeout), "put_object"))
        for i, f in enumerate(todo)
    ]
    result = fleet.run(inst.id, script.upload(root, run_id, uploads), timeout=timeout)
    records = script.parse_records(result.stdout, "put")
    if "nocurl" in result.stdout:
        raise RunctlError(
            f"{inst.label} has no `curl`, so it cannot upload its checkpoints.",
            fix="Install curl on the instance (`sudo apt-get install -y curl`), then retry.",
        )
    now = datetime.now(UTC)
    for i, f in enumerate(todo):
        outcome, why = records.get(i, ("", ""))
        if outcome == "200" and fleet.object_size(keys[i]) == f.size:
            stored.add(
                Stored(
                    name=f.name,
                    key=keys[i],
                    size=f.size,
                    mtime=f.mtime,
                    sha256=f.sha256,
                    backed_up_at=now,
                    run_id=saver.run_id,
                    instance_id=inst.id,
                )
            )
            out.uploaded.append(stored.files[-1])
        elif outcome == "changed":
            out.failed.append((f.name, "it changed while it was being backed up; run the backup again"))
        elif outcome == "gone":
            out.failed.append((f.name, "it was deleted before it could be uploaded"))
        else:
            said = f"HTTP {outcome}" + (f", {why}" if why else "") if outcome else "no answer from the upload"
            out.failed.append((f.name, f"S3 did not take it ({said})"))
    if len(out.uploaded) > before:
        stored.instance_id = inst.id
        backups.save(fleet, stored)


def _verify(svc: Services, inst: Instance, stored: RunBackup, out: RunOutcome) -> None:
    """What the manifest counts as backed up is in S3 with its size (ListObjectsV2), or the
    backup says which is not and forgets it, so the next backup uploads it again."""
    if not stored.files:
        return
    held = backups.sizes(svc.fleet, stored.run_id)
    missing = [f for f in stored.files if held.get(f.key) != f.size]
    if not missing:
        return
    for f in missing:
        out.failed.append((f.name, "it is not in S3 with its size; run the backup again"))
    gone = {f.name for f in missing}
    out.uploaded = [f for f in out.uploaded if f.name not in gone]
    stored.files = [f for f in stored.files if f.name not in gone]
    backups.save(svc.fleet, stored)


def saved_in(svc: Services, saver: Run) -> list[str]:
    """The directories the run's command names (`--checkpoint-dir`, `--output-dir`), from the
    bot's records of it and of the run whose checkpoints it continues."""
    owner = svc.runs.get(saver.checkpoint_run_id) if saver.checkpoint_run_id else None
    found = option_values(saver.args, DIR_OPTIONS) + (option_values(owner.args, DIR_OPTIONS) if owner else [])
    return list(dict.fromkeys(found))
