"""What S3 holds of a run's checkpoints: `runctl/checkpoints/<run-id>/`, one object per
file (keys from `workers.remote.backup.s3_suffix`) and `runctl-manifest.json`, which the
worker writes after each upload with every file's name, size, mtime and sha256, and the run
and instance it came from (per Redis: `workers.jobs.backup.writer`).

A restore takes a file only when that binding still holds in Redis (`restorable`): the
run writes these checkpoints and ran on that instance. Manifests written before files were
bound carry one binding for all (the top-level `run_id` and `instance_id`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel, Field, ValidationError, model_validator

from workers.aws.boundary import aws_call
from workers.aws.fleet import Fleet
from workers.remote.backup import restorable_name, s3_suffix
from workers.remote.checkpoints import FoundCheckpoint
from workers.state.runs import Run

PREFIX = "runctl/checkpoints/"


class Stored(BaseModel):
    name: str  # as discovery names it: bare, ./relative or /absolute
    key: str
    size: int
    mtime: int  # the file's mtime on the instance when it was uploaded (epoch seconds)
    sha256: str
    backed_up_at: datetime
    run_id: str = ""  # the run that saved it, on
    instance_id: str = ""  # the instance it was uploaded from


class RunBackup(BaseModel):
    format_version: int = 1
    run_id: str
    instance_id: str = ""
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: list[Stored] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bind_legacy_files(self) -> RunBackup:
        """Files of an older manifest are bound to its top level as read, before anything moves it."""
        for f in self.files:
            f.run_id = f.run_id or self.run_id
            f.instance_id = f.instance_id or self.instance_id
        return self

    def find(self, name: str) -> Stored | None:
        return next((f for f in self.files if f.name == name), None)

    def has(self, name: str, sha256: str) -> bool:
        found = self.find(name)
        return found is not None and bool(sha256) and found.sha256 == sha256

    def holds(self, ck: FoundCheckpoint) -> bool:
        """The listed checkpoint is in S3 as it is on the instance (same name, size and mtime)."""
        found = self.find(ck.name)
        return (
            found is not None
            and not ck.is_dir
            and found.size == ck.size
            and found.mtime == int(ck.modified_at.timestamp())
        )

    def add(self, stored: Stored) -> None:
        self.files = [f for f in self.files if f.name != stored.name] + [stored]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def manifest_key(run_id: str) -> str:
    return f"{PREFIX}{run_id}/runctl-manifest.json"


def object_key(run_id: str, suffix: str) -> str:
    return f"{PREFIX}{run_id}/{suffix}"


def load(fleet: Fleet, run_id: str) -> RunBackup | None:
    raw = fleet.read_object(manifest_key(run_id))
    if raw is None:
        return None
    try:
        return RunBackup.model_validate_json(raw)
    except ValidationError:
        return None


def load_bound(fleet: Fleet, run_id: str, lookup: Callable[[str], Run | None]) -> RunBackup | None:
    """The run's manifest with only the files Redis binds to it (`why_unbound`): what counts
    as backed up (for a terminate, a listing, the next backup)."""
    stored = load(fleet, run_id)
    if stored is None or stored.run_id != run_id:
        return None
    stored.files = [f for f in stored.files if not why_unbound(f, run_id, lookup)]
    return stored


def save(fleet: Fleet, backup: RunBackup) -> None:
    backup.updated_at = datetime.now(UTC)
    fleet.put_object(manifest_key(backup.run_id), backup.model_dump_json(indent=1).encode())


def sizes(fleet: Fleet, run_id: str) -> dict[str, int]:
    """Every object under the run's prefix with its size, as S3 lists it (ListObjectsV2)."""
    found: dict[str, int] = {}
    with aws_call(f"list s3://{fleet.bucket}/{PREFIX}{run_id}/"):
        for page in fleet.s3.get_paginator("list_objects_v2").paginate(
            Bucket=str(fleet.bucket), Prefix=f"{PREFIX}{run_id}/"
        ):
            found.update({str(o["Key"]): int(o["Size"]) for o in page.get("Contents", [])})
    return found


def why_unbound(f: Stored, owner: str, lookup: Callable[[str], Run | None]) -> str:
    """ "" when Redis confirms the file's binding: the run it names writes `owner`'s checkpoints
    and ran on the instance it was uploaded from, and its key is its name's; else why not."""
    writer = lookup(f.run_id) if f.run_id else None
    if writer is None:
        return f"uploaded for run {f.run_id or '(none)'}, which runctl has no record of"
    if (writer.checkpoint_run_id or writer.run_id) != owner:
        return f"uploaded for run {f.run_id}, which does not save run {owner}'s checkpoints"
    if writer.instance_id != f.instance_id:
        where = f.instance_id or "an unknown instance"
        return f"uploaded from {where}, not from {writer.instance_id}, where run {f.run_id} ran"
    if f.key != object_key(owner, s3_suffix(f.name)):
        return "its S3 key is not its name's"
    return ""


@dataclass
class Restorable:
    files: list[Stored] = field(default_factory=list)  # bound, and named into the checkpoint directory
    outside: list[Stored] = field(default_factory=list)  # bound, saved elsewhere (work dir, absolute): S3 keeps them
    foreign: list[tuple[Stored, str]] = field(default_factory=list)  # refused: (file, why)


def restorable(backup: RunBackup | None, owner: str, lookup: Callable[[str], Run | None]) -> Restorable:
    """What of `owner`'s S3 backup a restore may write, and what it refuses. A restore writes
    only plain names into the run's checkpoint directory; anything else stays in S3."""
    found = Restorable()
    if backup is None:
        return found
    cache: dict[str, Run | None] = {}

    def cached(run_id: str) -> Run | None:
        if run_id not in cache:
            cache[run_id] = lookup(run_id)
        return cache[run_id]

    for f in backup.files:
        why = f"the manifest is run {backup.run_id}'s" if backup.run_id != owner else why_unbound(f, owner, cached)
        if why:
            found.foreign.append((f, why))
        elif restorable_name(f.name):
            found.files.append(f)
        else:
            found.outside.append(f)
    return found
