"""`/runctl audit [N] [--instance i-…] [--user @x]`: the newest audit records, for admins,
as an ephemeral reply that stays within Slack's limits."""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import Block, ContextBlock, MarkdownTextObject, SectionBlock

from workers import audit as trail
from workers import policy
from workers.commands import AuditCommand, Requester
from workers.errors import RunctlError
from workers.services import current
from workers.slack.client import MAX_TEXT
from workers.slack.escape import code, escape

MAX_LINE = 600
MAX_SECTIONS = 45
MARK = {"allowed": ":white_check_mark:", "refused": ":no_entry:", "failed": ":x:"}


def audit(command: dict[str, Any], requester: dict[str, Any]) -> str:
    svc = current()
    cmd = AuditCommand.model_validate(command)
    who = Requester.model_validate(requester)
    settings = svc.settings
    try:
        policy.recheck(settings, who, "audit")
    except RunctlError as exc:
        trail.record(svc.redis, settings.RUNCTL_AUDIT_MAXLEN, trail.of(who, "refused", exc.what))
        svc.notifier.ephemeral(who.channel_id, who.user_id, exc.as_text())
        return "refused"
    records = trail.newest(svc.redis, cmd.count, cmd.instance_id, cmd.user)
    title = title_of(cmd, len(records))
    sections = [SectionBlock(text=MarkdownTextObject(text=chunk)) for chunk in chunks([line(r) for r in records])]
    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=title)), *sections]
    if len(sections) > MAX_SECTIONS:
        blocks = blocks[: MAX_SECTIONS + 1]
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text="… more records; ask for fewer (N).")]))
    svc.notifier.ephemeral(who.channel_id, who.user_id, title, blocks)
    trail.record(svc.redis, settings.RUNCTL_AUDIT_MAXLEN, trail.of(who, "allowed", f"showed {len(records)} records"))
    return "ok"


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


def line(r: trail.Record) -> str:
    parts = [
        f"<!date^{int(r.time.timestamp())}^{{date_short}} {{time_secs}}|{r.time:%Y-%m-%d %H:%M:%S} UTC>",
        f"<@{r.user}>" if r.user else "?",
    ]
    if r.channel:
        parts.append(f"<#{r.channel}>")
    parts.append(f"{MARK.get(r.decision, '')} {r.decision}")
    what = " → ".join(x for x in (code(r.text, 300) if r.text else "", escape(r.outcome)) if x)
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
