"""What S3 holds of a run's checkpoints: `runctl/checkpoints/<run-id>/`, one object per
file (keys from `workers.remote.backup.s3_suffix`) and `runctl-manifest.json`, which the
worker writes after each upload with every file's name, size, mtime and sha256."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field, ValidationError

from workers.aws.fleet import Fleet
from workers.remote.checkpoints import FoundCheckpoint

PREFIX = "runctl/checkpoints/"


class Stored(BaseModel):
    name: str  # as discovery names it: bare, ./relative or /absolute
    key: str
    size: int
    mtime: int  # the file's mtime on the instance when it was uploaded (epoch seconds)
    sha256: str
    backed_up_at: datetime


class RunBackup(BaseModel):
    format_version: int = 1
    run_id: str
    instance_id: str = ""
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    files: list[Stored] = Field(default_factory=list)

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


def save(fleet: Fleet, backup: RunBackup) -> None:
    backup.updated_at = datetime.now(UTC)
    fleet.put_object(manifest_key(backup.run_id), backup.model_dump_json(indent=1).encode())
