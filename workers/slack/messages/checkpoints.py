"""The `/runctl checkpoints` listing: a run's checkpoints with integrity, place (instance, S3) and hints."""

from __future__ import annotations

from datetime import datetime

from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers.aws.backups import RunBackup
from workers.aws.instance import Instance
from workers.errors import RunctlError
from workers.remote.checkpoints import CheckpointListing, FoundCheckpoint
from workers.slack.client import MAX_TEXT, clamp
from workers.slack.escape import code, escape
from workers.slack.format import duration, size
from workers.slack.messages import Message

MAX_ROWS = 60
MAX_BLOCKS = 50
PROTOCOL_DOC = "the checkpoint manifest section of `training/README.md`"


def checkpoint_line(ck: FoundCheckpoint, now: datetime, newest_valid: bool = False, in_manifest: bool = True) -> str:
    """One row: integrity mark, name, epoch, size, age (and why, if corrupt)."""
    facts = [f"epoch {ck.epoch}"] if ck.epoch is not None else []
    facts.append(size(ck.size) + (" (directory)" if ck.is_dir else ""))
    if ck.problem != "file is missing":
        facts.append(f"{duration((now - ck.modified_at).total_seconds())} ago")
    body = f"{code(ck.name)} · " + " · ".join(facts)
    if ck.sha256_ok is False:
        return f":x: *CORRUPT* {body} — {escape(ck.problem)}"
    if ck.sha256_ok is True:
        return f":white_check_mark: {body}" + ("  :star: *newest valid*" if newest_valid else "")
    return f"• {body}" + ("" if in_manifest else "  _(integrity unknown: no sha256 for it in the manifest)_")


def listing_message(
    inst: Instance,
    listing: CheckpointListing,
    asked_run: str | None,
    user_id: str,
    now: datetime,
    stored: RunBackup | None = None,
) -> Message:
    iid = inst.id
    if listing.missing:
        known = ", ".join(code(r) for r in listing.known_runs)
        err = RunctlError(
            f"No run {code(listing.run_id)} on {inst.label}.",
            why=f"Runs with checkpoints there: {known}." if known else "No run there has checkpoints.",
            fix=f"/runctl checkpoints {iid} --run {escape(listing.known_runs[0])}"
            if listing.known_runs
            else f"/runctl checkpoints {iid}",
        )
        return Message(err.what, [_section(err.as_text())])
    if listing.run_id is None:
        text = (
            f":open_file_folder: No runs on {inst.label} yet, so no checkpoints. "
            f"Start one: `/runctl train {iid} train_with_checkpoints.py`"
        )
        return Message(text, [_section(text)])
    run = listing.run_id
    if not listing.checkpoints:
        text = f":open_file_folder: Run {code(run)} on {inst.label} has no checkpoints."
        hint = (
            "Save checkpoints to `$RUNCTL_CHECKPOINT_DIR` (runctl sets it for every run) so that a stop "
            f"or an instance loss doesn't cost the work; see {PROTOCOL_DOC}."
        )
        return Message(text, [_section(text), _context(hint)])

    count = len(listing.checkpoints)
    best = listing.newest_valid
    summary = f"{count} checkpoint{'s' if count != 1 else ''} · {size(listing.total_size)}"
    if best is not None:
        summary += f" · newest valid: {code(best.name)}" + (f" (epoch {best.epoch})" if best.epoch is not None else "")
    head = f":floppy_disk: *Checkpoints of run {code(run)}* on {inst.label}\n{summary}"
    blocks: list[Block] = [_section(head)]
    if asked_run is None and listing.newest_run_id and listing.newest_run_id != run:
        blocks.append(
            _context(
                f"The newest run, {code(listing.newest_run_id)}, has no checkpoints of its own (a resumed run "
                f"writes into the run it resumed), so this is run {code(run)}, the newest with checkpoints. "
                f"Another run: `/runctl checkpoints {iid} --run RUN_ID`"
            )
        )
    # Without any manifest one hint says it all; with one, rows lacking an entry say so themselves.
    rows = [
        checkpoint_line(ck, now, ck is best, in_manifest=not listing.has_manifest or ck.sha256_ok is not None)
        + where(ck, stored)
        for ck in listing.checkpoints[:MAX_ROWS]
    ]
    left_out = count - len(rows) + listing.omitted
    if left_out > 0:
        rows.append(f"… and {left_out} more not shown")
    blocks.extend(_section(chunk) for chunk in _chunks(rows))

    if stored is not None:
        on_disk = {c.name for c in listing.checkpoints}
        only = [f for f in stored.files if f.name not in on_disk and f.name not in ("manifest.json", "completed.json")]
        if only:
            blocks.append(
                _context(
                    f":cloud: {len(only)} more only in S3 (not on this disk): "
                    + ", ".join(code(f.name) for f in only[:10])
                    + (" …" if len(only) > 10 else "")
                    + f". `/runctl resume {escape(listing.run_id or '')}` restores them."
                )
            )
    corrupt = listing.corrupt
    if corrupt:
        blocks.append(_section(_corrupt_warning(corrupt, best, user_id)))
    if listing.unverified:
        if not listing.has_manifest:
            blocks.append(
                _context(
                    ":information_source: No `manifest.json` in this run's checkpoint directory, so integrity "
                    "can't be checked. Record each checkpoint's file, sha256, size and epoch in a manifest to "
                    f"get a :white_check_mark:/:x: here; see {PROTOCOL_DOC}, or copy what "
                    "`train_with_checkpoints.py` does."
                )
            )
        else:
            blocks.append(
                _context(
                    ":information_source: Files marked • have no manifest entry with a sha256, so their "
                    f"integrity is unknown; see {PROTOCOL_DOC}."
                )
            )
    text = f"Checkpoints of run {escape(run)} on {inst.label}: {summary}" + (
        f" · {len(corrupt)} corrupt" if corrupt else ""
    )
    return Message(text, blocks[:MAX_BLOCKS])


def where(ck: FoundCheckpoint, stored: RunBackup | None) -> str:
    """Where the checkpoint lives: on the instance only, or in S3 too."""
    if stored is not None and stored.holds(ck):
        return " · instance + S3"
    return " · instance only"


def _corrupt_warning(corrupt: list[FoundCheckpoint], best: FoundCheckpoint | None, user_id: str) -> str:
    names = ", ".join(f"{code(c.name)} ({escape(c.problem)})" for c in corrupt[:10])
    if len(corrupt) > 10:
        names += f" and {len(corrupt) - 10} more"
    one = len(corrupt) == 1
    lines = [
        f":warning: <@{user_id}> {len(corrupt)} corrupt checkpoint{'' if one else 's'}: {names}.",
        "A truncated or changed file usually means a kill during a write or a full disk "
        "(check with `df -h` on the instance).",
    ]
    if best is not None:
        where = f" (epoch {best.epoch})" if best.epoch is not None else ""
        lines.append(
            f"Resume from {code(best.name)}{where}, the newest valid one. `train_with_checkpoints.py` "
            "does that on its own: it skips corrupt checkpoints with a warning."
        )
    else:
        lines.append("No valid checkpoint is left in this run: a resume starts from the beginning.")
    return clamp("\n".join(lines))


def _chunks(rows: list[str]) -> list[str]:
    """Pack rows into section texts of at most MAX_TEXT characters."""
    chunks: list[str] = []
    current = ""
    for row in rows:
        row = clamp(row, 500)
        if current and len(current) + 1 + len(row) > MAX_TEXT:
            chunks.append(current)
            current = ""
        current = f"{current}\n{row}" if current else row
    if current:
        chunks.append(current)
    return chunks


def _section(text: str) -> SectionBlock:
    return SectionBlock(text=MarkdownTextObject(text=clamp(text)))


def _context(text: str) -> ContextBlock:
    return ContextBlock(elements=[MarkdownTextObject(text=clamp(text))])
