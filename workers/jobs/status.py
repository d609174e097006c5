"""`/runctl status`: the instance, its live run and the lock holder, as an ephemeral reply."""

from __future__ import annotations

from typing import Any

from workers import audit, policy
from workers.commands import Requester, StatusCommand
from workers.errors import RunctlError
from workers.services import current
from workers.slack.format import duration
from workers.slack.messages.run import checkpoint_text, progress_text
from workers.state.locks import train_lock


def status(command: dict[str, Any], requester: dict[str, Any]) -> str:
    svc = current()
    cmd = StatusCommand.model_validate(command)
    who = Requester.model_validate(requester)
    try:
        policy.recheck(svc.settings, who, "status")
        text, entry = describe(cmd.instance_id), audit.of(who, "allowed", "answered", instance=cmd.instance_id)
    except RunctlError as exc:
        text, entry = exc.as_text(), audit.of(who, audit.decision_of(exc), exc.what, instance=cmd.instance_id)
    svc.notifier.ephemeral(who.channel_id, who.user_id, text)
    audit.record(svc.redis, svc.settings.RUNCTL_AUDIT_MAXLEN, entry)
    return text


def describe(instance_id: str) -> str:
    svc = current()
    now = svc.clock()
    inst = svc.fleet.get(instance_id)
    lines = [f"*{inst.label}* · {inst.type} · `{inst.state}`"]
    if inst.state == "running" and inst.launch_time:
        lines.append(f"Up {duration((now - inst.launch_time).total_seconds())} (since last start)")
    run = svc.runs.live_on(instance_id)
    if run:
        since = run.started_at or run.created_at
        lines.append(
            f"Live run `{run.run_id}`: <@{run.user_id}> · `{run.script}` · {run.state.value} "
            f"for {duration((now - since).total_seconds())}"
        )
        if run.progress:
            lines.append(progress_text(run.progress))
        if run.checkpoint:
            lines.append("Newest checkpoint: " + checkpoint_text(run.checkpoint, now))
        if run.env_hash:
            built = f", built {run.env_built_at:%Y-%m-%d %H:%M} UTC" if run.env_built_at else ""
            lines.append(f"Environment `envs/{run.env_hash}`{built}")
    else:
        last = svc.runs.latest(instance_id)
        lines.append("No live run." + (f" Last: `{last.run_id}` {last.state.value}." if last else ""))
    holder = train_lock(svc.redis, instance_id).holder()
    if holder:
        lines.append(f"Train lock: run `{holder.run_id}` by <@{holder.user_id}>")
    else:
        lines.append("Train lock: free")
    return "\n".join(lines)
