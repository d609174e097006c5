"""Checkpoint discovery: what checkpoints a run left on an instance, and whether
each still matches its manifest entry (sha256 and size, checked on the instance).

Shared by `/runctl checkpoints`, the stop report and the terminate warning.
Each call is one SSM command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workers import scripts
from workers.errors import RemoteError
from workers.fleet import Fleet
from workers.scripts.checkpoints import list_all_checkpoints, list_checkpoints

# Hashing multi-GB checkpoints takes a while; the listing waits for it.
DISCOVERY_TIMEOUT = 600

_EPOCH_IN_NAME = re.compile(r"epoch[-_]?0*(\d+)", re.IGNORECASE)

_PROBLEMS = {
    "sha": "sha256 does not match the manifest",
    "missing": "file is missing",
    "unreadable": "file cannot be read",
}
_UNKNOWN = {"nosha", "unverified"}  # manifest entry without a sha256, or verify=False


@dataclass(frozen=True)
class FoundCheckpoint:
    name: str
    size: int
    modified_at: datetime
    epoch: int | None
    sha256_ok: bool | None  # None: no manifest entry (or no sha256 in it), integrity unknown
    problem: str = ""  # why sha256_ok is False, in words
    is_dir: bool = False


@dataclass(frozen=True)
class CheckpointListing:
    run_id: str | None  # None: the instance has no run directories
    checkpoints: list[FoundCheckpoint]  # newest first: by epoch where known, then by mtime
    has_manifest: bool
    newest_run_id: str | None = None  # the newest run on the instance (with run_id=None asked)
    missing: bool = False  # the asked run has no directory on the instance
    known_runs: tuple[str, ...] = ()  # with `missing`: runs that do have checkpoints, newest first
    omitted: int = 0  # files left out of the listing to keep it small

    @property
    def newest(self) -> FoundCheckpoint | None:
        return self.checkpoints[0] if self.checkpoints else None

    @property
    def newest_valid(self) -> FoundCheckpoint | None:
        """The newest checkpoint whose sha256 and size were verified."""
        return next((c for c in self.checkpoints if c.sha256_ok is True), None)

    @property
    def corrupt(self) -> list[FoundCheckpoint]:
        return [c for c in self.checkpoints if c.sha256_ok is False]

    @property
    def unverified(self) -> list[FoundCheckpoint]:
        return [c for c in self.checkpoints if c.sha256_ok is None]

    @property
    def total_size(self) -> int:
        return sum(c.size for c in self.checkpoints)


def discover(
    fleet: Fleet, root: str, instance_id: str, run_id: str | None, verify: bool = True
) -> CheckpointListing:
    """The checkpoints of `run_id`, or of the newest run that has any (else the newest run)."""
    listings = parse(_run(fleet, instance_id, list_checkpoints(root, run_id, verify)))
    if listings:
        return listings[0]
    return CheckpointListing(run_id=run_id, checkpoints=[], has_manifest=False)


def discover_all(fleet: Fleet, root: str, instance_id: str, verify: bool = True) -> list[CheckpointListing]:
    """Every run directory on the instance that holds checkpoints, newest run first."""
    return [
        listing
        for listing in parse(_run(fleet, instance_id, list_all_checkpoints(root, verify)))
        if listing.run_id is not None
    ]


def _run(fleet: Fleet, instance_id: str, script: str) -> str:
    result = fleet.run(instance_id, script, timeout=DISCOVERY_TIMEOUT)
    if not result.ok:
        raise RemoteError(
            f"Listing the checkpoints on {instance_id} failed ({result.status}, exit {result.exit_code}).",
            why="The discovery script could not read the run directories.",
            fix=f"/runctl status {instance_id}",
            detail=(result.stderr or result.stdout).strip()[-1500:],
        )
    return result.stdout


@dataclass
class _Draft:
    run_id: str | None
    checkpoints: list[FoundCheckpoint] = field(default_factory=list)
    has_manifest: bool = False
    omitted: int = 0


def parse(output: str) -> list[CheckpointListing]:
    """Listings from the discovery script's output; malformed lines are skipped."""
    lines = output.splitlines()
    if output and not output.endswith("\n"):
        lines = lines[:-1]  # cut by the output limit mid-line
    newest_run: str | None = None
    missing: str | None = None
    known: list[str] = []
    drafts: list[_Draft] = []
    for line in lines:
        if not line.startswith(scripts.SECTION):
            continue
        word, _, rest = line[len(scripts.SECTION) :].partition(" ")
        if word == "newest":
            newest_run = rest.strip() or None
        elif word == "norun":
            missing = rest.strip()
        elif word == "known":
            known.append(rest.strip())
        elif word == "run":
            drafts.append(_Draft(run_id=rest.strip()))
        elif drafts and word == "manifest":
            drafts[-1].has_manifest = True
        elif drafts and word == "more" and rest.strip().isdigit():
            drafts[-1].omitted = int(rest)
        elif drafts and word in ("entry", "file", "dir"):
            found = _entry(rest) if word == "entry" else _file(rest, is_dir=word == "dir")
            if found is not None:
                drafts[-1].checkpoints.append(found)
    if missing is not None:
        return [
            CheckpointListing(
                run_id=missing, checkpoints=[], has_manifest=False, missing=True, known_runs=tuple(known)
            )
        ]
    if not drafts:
        return []
    return [
        CheckpointListing(
            run_id=d.run_id,
            checkpoints=sorted(d.checkpoints, key=_newest_first),
            has_manifest=d.has_manifest,
            newest_run_id=newest_run,
            omitted=d.omitted,
        )
        for d in drafts
    ]


def _newest_first(c: FoundCheckpoint) -> tuple[int, int, float, str]:
    known = 0 if c.epoch is not None else 1
    return (known, -(c.epoch or 0), -c.modified_at.timestamp(), c.name)


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _time(epoch_seconds: str, iso: str = "-") -> datetime:
    if epoch_seconds.isdigit():
        return datetime.fromtimestamp(int(epoch_seconds), UTC)
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _entry(rest: str) -> FoundCheckpoint | None:
    parts = rest.split(" ", 6)
    if len(parts) != 7 or not parts[6]:
        return None
    status, epoch, size, want_size, mtime, created, name = parts
    if status == "ok":
        ok: bool | None = True
    elif status in _UNKNOWN:
        ok = None
    else:
        ok = False
    problem = _PROBLEMS.get(status, "")
    if status == "size":
        problem = f"size is {size} bytes, the manifest says {want_size}"
    elif ok is False and not problem:
        problem = f"integrity check failed ({status})"
    return FoundCheckpoint(
        name=name,
        size=_int(size) or 0,
        modified_at=_time(mtime, created),
        epoch=_int(epoch),
        sha256_ok=ok,
        problem=problem,
    )


def _file(rest: str, is_dir: bool) -> FoundCheckpoint | None:
    parts = rest.split(" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2]:
        return None
    match = _EPOCH_IN_NAME.search(parts[2])
    return FoundCheckpoint(
        name=parts[2],
        size=int(parts[0]),
        modified_at=_time(parts[1]),
        epoch=int(match.group(1)) if match else None,
        sha256_ok=None,
        is_dir=is_dir,
    )
