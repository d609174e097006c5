"""`/runctl logs <instance-id> [--run RUN_ID] [--lines N] [--grep TEXT]`: the tail of a
run's training.log in a code block, in the run's thread when asked in its channel, else
privately; and [Full log]: the whole file attached in the run's thread. Who may read which
run's log: `log_access`.

The whole file does not fit SSM's 24,000 characters of output, so the instance PUTs it to
a presigned S3 URL (it has no credentials), the worker fetches it, deletes the object and
uploads it to Slack. The URL lives only in the SSM command: never in Slack or a log.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers.aws.fleet import PRESIGN_MARGIN_SECONDS
from workers.aws.instance import Instance
from workers.commands import LogsCommand
from workers.errors import RemoteError, RunctlError
from workers.jobs import funnel, log_access
from workers.jobs.funnel import Job
from workers.jobs.preflight import Refusals, require_running
from workers.redact import redact
from workers.remote.logs import LOG_NAME, LogTail, LogUpload, parse_tail, parse_upload, tail_script, upload_script
from workers.services import Services
from workers.slack import updates
from workers.slack.client import clamp
from workers.slack.escape import code, escape
from workers.slack.format import size
from workers.slack.logtext import clean_lines, code_blocks
from workers.slack.messages.run import full_log_actions
from workers.slack.reach import channel_error
from workers.state.runs import Run, RunState

TAIL_SECONDS = 120
UPLOAD_SECONDS = 600  # the upload command's delivery timeout, and its execution timeout
BLOCKS_PER_MESSAGE = 4  # code blocks in one message: a long tail continues in the next
MAX_MESSAGES = 8
LOG_PREFIX = "runctl/logs/"


def reachable(svc: Services, instance_id: str, doing: str) -> Instance:
    """The instance, if a script can run on it now; else a typed error with the way out."""
    inst = svc.fleet.get(instance_id)
    require_running(
        inst,
        Refusals(
            stopped=f", so runctl cannot {doing}.",
            stopped_why="The log is on the instance's disk, read through SSM; a stopped instance keeps it.",
            stopped_fix=f"/runctl start {instance_id}",
            gone="; its disk and the logs on it are gone.",
            pending_why="Its SSM agent needs a minute.",
        ),
    )
    svc.fleet.require_agent(inst, "reads training logs")
    return inst


def newest_run(svc: Services, instance_id: str) -> Run | None:
    """The newest run on the instance that got as far as starting (it has a log)."""
    return next((r for r in svc.runs.history(instance_id, 20) if r.started_at is not None), None)


@funnel.command(LogsCommand)
def logs(job: Job, cmd: LogsCommand) -> str:
    svc = job.svc
    run = svc.runs.get(cmd.run_id) if cmd.run_id else newest_run(svc, cmd.instance_id)
    if run is not None and cmd.instance_id not in run.node_ids:
        raise RunctlError(
            f"Run {code(run.run_id)} ran on `{run.instance_id}`, not `{cmd.instance_id}`.",
            fix=f"/runctl logs {run.instance_id} --run {run.run_id}",
        )
    if run is not None or cmd.run_id:  # before anything is read
        log_access.check(svc.settings, job.actor, run, cmd.run_id or "", cmd.instance_id)
    where = cmd.instance_id
    if cmd.node is not None:  # a multi-node run: that node's torchrun log
        if run is None or cmd.node >= len(run.node_ids):
            count = len(run.node_ids) if run is not None else 0
            raise RunctlError(
                f"`--node {cmd.node}`: run {code(run.run_id) if run else 'on ' + cmd.instance_id} has "
                f"{count} node{'s' if count != 1 else ''} (numbered from 0).",
                fix=f"/runctl logs {cmd.instance_id}" + (f" --run {run.run_id}" if run else ""),
            )
        where = run.node_ids[cmd.node]
    inst = reachable(svc, where, "read its logs")
    asked = run.run_id if run is not None else cmd.run_id
    script = tail_script(svc.settings.RUNCTL_REMOTE_ROOT, asked, cmd.lines, cmd.grep)
    result = svc.fleet.run(where, script, TAIL_SECONDS)
    if not result.ok:
        raise RemoteError(f"Reading the log on {inst.label} failed.", why=escape(redact(result.stderr[-500:])))
    tail = parse_tail(result.stdout)
    if run is None and tail.run_id:
        run = svc.runs.get(tail.run_id)
    if tail.run_id:  # the run the instance answered for, when none was asked for
        log_access.check(svc.settings, job.actor, run, tail.run_id, cmd.instance_id)
    if run is not None and run.message_ts and run.channel_id == job.actor.channel_id:
        job.thread_ts = run.message_ts  # in the run's thread; asked elsewhere, privately
    messages = tail_messages(inst, cmd, tail, run)
    for text, blocks in messages:
        job.tell(text, blocks)
    return f"showed {tail.run_id or 'no run'}: {cmd.lines} lines" + (" (grep)" if cmd.grep else "")


def tail_messages(inst: Instance, cmd: LogsCommand, tail: LogTail, run: Run | None) -> list[tuple[str, list[Block]]]:
    iid = inst.id
    if tail.run_id is None:
        text = f":page_facing_up: No run on {inst.label} has a {LOG_NAME} yet."
        return [(text, [_section(text)])]
    rid = tail.run_id
    if tail.missing:
        err = RunctlError(
            f"Run {code(rid)} has no {LOG_NAME} on {inst.label}.",
            why="It never started there, or its directory was removed.",
            fix=f"/runctl logs {iid}",
        )
        return [(err.what, [_section(err.as_text())])]
    lines = clean_lines(tail.data)
    if tail.cut and lines:
        lines = lines[1:]  # the first line was cut mid-way to fit
    what = f"lines holding {code(cmd.grep)}" if cmd.grep else "lines"
    of = f"{tail.matches:,}" if tail.matches is not None else f"{tail.lines:,}"
    head = (
        f":page_facing_up: *{LOG_NAME} of run {code(rid)}* on {inst.label}\n"
        f"last {len(lines):,} of {of} {what} · {size(tail.size)} in all"
    )
    notes: list[str] = []
    if tail.cut:
        notes.append(f"Only the last {len(lines):,} of the {cmd.lines:,} lines asked for fit in one answer.")
    if run is not None and not run.state.ended and run.state is not RunState.QUEUED:
        notes.append(f"The run is {run.state.value}; its parent message follows it live.")
    notes.append(
        f"More: `/runctl logs {iid} --run {escape(rid)} --lines 500`"
        + (" · all of it: [Full log]" if run is not None else "")
    )
    blocks_text = code_blocks(lines) if lines else ["_(no lines" + (" hold that text)_" if cmd.grep else ")_")]
    fallback = f"{LOG_NAME} of run {escape(rid)} on {inst.label}: last {len(lines)} {what}"
    chunks = [blocks_text[i : i + BLOCKS_PER_MESSAGE] for i in range(0, len(blocks_text), BLOCKS_PER_MESSAGE)]
    if len(chunks) > MAX_MESSAGES:
        chunks = chunks[-MAX_MESSAGES:]
    messages: list[tuple[str, list[Block]]] = []
    for n, chunk in enumerate(chunks):
        blocks: list[Block] = [_section(head)] if n == 0 else []
        blocks.extend(SectionBlock(text=MarkdownTextObject(text=b)) for b in chunk)
        if n == len(chunks) - 1:
            blocks.append(ContextBlock(elements=[MarkdownTextObject(text=clamp(" ".join(notes)))]))
            if run is not None:
                blocks.append(full_log_actions(run.run_id))
        part = f" (part {n + 1} of {len(chunks)})" if len(chunks) > 1 else ""
        messages.append((fallback + part, blocks))
    return messages


@funnel.click("[Full log]", 1, "logs")
def full_log(job: Job, run_id: str) -> str:
    svc = job.svc
    run = svc.runs.get(run_id)
    if run is None:
        raise RunctlError(f"runctl no longer knows run {code(run_id)}.", fix="/runctl resources")
    job.instance_id = run.instance_id
    log_access.check(svc.settings, job.actor, run, run.run_id, run.instance_id)
    if not run.state.ended:
        updates.watch(svc, run.run_id)  # someone is looking: its message is updated first (issue 28)
    if run.message_ts and run.channel_id == job.actor.channel_id:
        job.thread_ts = run.message_ts
    inst = reachable(svc, run.instance_id, f"fetch the {LOG_NAME} of run {run.run_id}")
    key = f"{LOG_PREFIX}{run.run_id}/{secrets.token_hex(8)}"
    # SSM may hold the command UPLOAD_SECONDS before it starts, then run it as long: the URL
    # outlives both, and no more.
    url = svc.fleet.presign(key, 2 * UPLOAD_SECONDS + PRESIGN_MARGIN_SECONDS, method="put_object")
    try:
        script = upload_script(svc.settings.RUNCTL_REMOTE_ROOT, run.run_id, url)
        result = svc.fleet.run(run.instance_id, script, UPLOAD_SECONDS)
        upload = parse_upload(result.stdout)
        _check(inst, run, upload, result.stderr)
        with tempfile.TemporaryDirectory(prefix="runctl-log-") as tmp:
            path = Path(tmp) / "log"
            got = svc.fleet.download(key, path)
            if got != upload.file_bytes:
                raise RemoteError(
                    f"The {LOG_NAME} of run {code(run.run_id)} arrived incomplete "
                    f"({got:,} of {upload.file_bytes:,} bytes).",
                    fix="Click [Full log] again.",
                )
            _attach(job, run, upload, path.read_bytes())
    finally:
        svc.fleet.delete(key)
    return f"attached the {LOG_NAME} of run {run.run_id}: {upload.log_bytes} bytes ({upload.encoding})"


def _check(inst: Instance, run: Run, upload: LogUpload, stderr: str) -> None:
    if upload.outcome == "nolog":
        raise RunctlError(f"Run {code(run.run_id)} has no {LOG_NAME} on {inst.label}.", fix=f"/runctl logs {inst.id}")
    if upload.outcome == "toolarge":
        raise RunctlError(
            f"The {LOG_NAME} of run {code(run.run_id)} is {size(upload.log_bytes)}, {size(upload.file_bytes)} "
            "gzipped: more than Slack takes in one file (1 GB).",
            fix=f"/runctl logs {inst.id} --run {run.run_id} --grep TEXT",
        )
    if not upload.ok:
        answer = f"S3 answered HTTP {upload.status}" + (f" ({escape(upload.s3_code)})" if upload.s3_code else "")
        if upload.outcome == "unreadable":
            answer = "the upload script said nothing runctl understands: " + escape(redact(stderr[-300:]))
        raise RemoteError(
            f"{inst.label} could not upload the {LOG_NAME} of run {code(run.run_id)} to S3.",
            why=answer + ". The instance must reach S3 over HTTPS in the bucket's region.",
            fix="Click [Full log] again; if it keeps failing, check the instance's route to S3.",
        )


def _attach(job: Job, run: Run, upload: LogUpload, content: bytes) -> None:
    gz = upload.encoding == "gzip"
    name = f"{run.run_id}-{LOG_NAME}" + (".gz" if gz else "")
    comment = (
        f"<@{job.actor.user_id}> the whole {LOG_NAME} of run `{run.run_id}`: {size(upload.log_bytes)}"
        + (f", gzipped to {size(upload.file_bytes)}" if gz else "")
        + "."
    )
    try:
        job.svc.notifier.upload(run.channel_id, name, content, title=name, comment=comment, thread_ts=run.message_ts)
    except SlackApiError as exc:
        error = channel_error(exc)
        raise RunctlError(
            f"Slack did not take the {LOG_NAME} of run {code(run.run_id)}.",
            why=f"Slack answered `{escape(exc.response.get('error', '?'))}`"
            + (": sharing a file needs runctl in the channel." if error else "."),
            fix="/invite @runctl, then click [Full log] again" if error else "Click [Full log] again.",
        ) from None


def _section(text: str) -> SectionBlock:
    return SectionBlock(text=MarkdownTextObject(text=clamp(text)))
