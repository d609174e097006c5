"""`/runctl audit [N] [--instance i-…] [--user @x]`: the newest audit records, for admins,
as an ephemeral reply that stays within Slack's limits."""

from __future__ import annotations

import re

from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers import audit as trail
from workers.commands import AuditCommand
from workers.jobs import funnel
from workers.jobs.funnel import Job
from workers.slack import people
from workers.slack.client import MAX_TEXT
from workers.slack.escape import code, escape

MAX_LINE = 600
MAX_SECTIONS = 45
MARK = {"allowed": ":white_check_mark:", "refused": ":no_entry:", "failed": ":x:", "dropped": ":warning:"}


@funnel.command(AuditCommand)
def audit(job: Job, cmd: AuditCommand) -> str:
    if cmd.user:
        cmd = cmd.model_copy(update={"user": people.resolve(job.svc.notifier.client, cmd.user, "audit")})
    records = trail.newest(job.svc.redis, cmd.count, cmd.instance_id, cmd.user)
    title = title_of(cmd, len(records))
    sections = [SectionBlock(text=MarkdownTextObject(text=chunk)) for chunk in chunks([line(r) for r in records])]
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=title)), *sections]
    if len(sections) > MAX_SECTIONS:
        blocks = blocks[: MAX_SECTIONS + 1]
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text="… more records; ask for fewer (N).")]))
    job.tell(title, blocks)
    return f"showed {len(records)} records"


def title_of(cmd: AuditCommand, found: int) -> str:
    filters = []
    if cmd.instance_id:
        filters.append(f"on `{cmd.instance_id}`")
    if cmd.user:
        filters.append(f"by <@{cmd.user}>")
    where = (" " + " ".join(filters)) if filters else ""
    if not found:
        return f"*Audit*: no records{where} yet."
    return f"*Audit*: the newest {found} record{'s' if found != 1 else ''}{where}, newest first."


_ESCAPED_TWICE = re.compile(r"&amp;(lt|gt|amp);")
_OUR_MENTION = re.compile(r"&lt;@([UW][A-Z0-9]{2,20})&gt;")


def outcome(text: str) -> str:
    """An outcome is often a message runctl wrote: mrkdwn whose untrusted parts are escaped already,
    and its mentions. Escaped again, `&lt;` and `<@U…>` would show as text (issue 31). So: escaped,
    then a user mention is a mention again (only a user's, in an admin's private answer: it pings
    nobody; `<!channel>` and links stay text), then what was escaped already is escaped once."""
    return _ESCAPED_TWICE.sub(r"&\1;", _OUR_MENTION.sub(r"<@\1>", escape(text)))


def line(r: trail.Record) -> str:
    parts = [
        f"<!date^{int(r.time.timestamp())}^{{date_short}} {{time_secs}}|{r.time:%Y-%m-%d %H:%M:%S} UTC>",
        f"<@{r.user}>" if r.user else "?",
    ]
    if r.channel:
        parts.append(f"<#{r.channel}>")
    parts.append(f"{MARK.get(r.decision, '')} {r.decision}")
    what = " → ".join(x for x in (code(r.text, 300) if r.text else "", outcome(r.outcome)) if x)
    if what:
        parts.append(what)
    if r.run_id:
        parts.append(f"run {code(r.run_id)}")
    if r.instance:
        parts.append(code(r.instance))
    text = " · ".join(parts)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def chunks(lines: list[str], limit: int = MAX_TEXT) -> list[str]:
    out: list[str] = []
    current = ""
    for entry in lines:
        candidate = f"{current}\n{entry}" if current else entry
        if len(candidate) > limit:
            out.append(current)
            current = entry
        else:
            current = candidate
    if current:
        out.append(current)
    return out
