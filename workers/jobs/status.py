"""`/runctl status`: the instance, its live run and the lock holder, as an ephemeral reply."""

from __future__ import annotations

from workers.commands import AUTOSTOP_MIN_MINUTES, StatusCommand
from workers.jobs import funnel, queued
from workers.jobs.funnel import Job
from workers.services import current
from workers.slack import updates
from workers.slack.escape import code
from workers.slack.format import duration
from workers.slack.messages.run import checkpoint_text, gpu_text, progress_text
from workers.state.autostop import AutostopStore
from workers.state.locks import train_lock


@funnel.command(StatusCommand)
def status(job: Job, cmd: StatusCommand) -> str:
    job.tell(describe(cmd.instance_id))
    return "answered"


def describe(instance_id: str) -> str:
    svc = current()
    now = svc.clock()
    inst = svc.fleet.get(instance_id)
    where = f" · {inst.region}" if len(svc.fleet.regions) > 1 else ""
    lines = [f"*{inst.label}* · {inst.type}{where} · `{inst.state}`"]
    if inst.state == "running" and inst.launch_time:
        lines.append(f"Up {duration((now - inst.launch_time).total_seconds())} (since last start)")
    run = svc.runs.live_on(instance_id)
    if run:
        updates.watch(svc, run.run_id)  # someone is looking: its message is updated first (issue 28)
        since = run.started_at or run.created_at
        lines.append(
            f"Live run `{run.run_id}`: <@{run.user_id}> · {code(run.script)} · {run.state.value} "
            f"for {duration((now - since).total_seconds())}"
        )
        if run.nodes:  # a multi-node run: every node, and which this is
            nodes = ", ".join(f"node {k} `{iid}`" for k, iid in enumerate(run.nodes))
            lines.append(
                f"On {len(run.nodes)} nodes with torchrun ({nodes}); this is node {run.nodes.index(instance_id)}."
            )
        if run.progress:
            lines.append(progress_text(run.progress))
        if run.checkpoint:
            lines.append("Newest checkpoint: " + checkpoint_text(run.checkpoint, now))
        if run.gpus:
            lines.append(gpu_text(run.gpus))
        if run.python:
            lines.append(f"Interpreter `{run.python}`")
        if run.env_hash:
            built = f", built {run.env_built_at:%Y-%m-%d %H:%M} UTC" if run.env_built_at else ""
            lines.append(f"Environment `envs/{run.env_hash}` (built from `{run.python or 'python3'}`){built}")
        elif run.python:
            lines.append("Environment: none (the interpreter's own packages)")
    else:
        last = svc.runs.latest(instance_id)
        lines.append("No live run." + (f" Last: `{last.run_id}` {last.state.value}." if last else ""))
    setting = AutostopStore(svc.redis).get(instance_id)
    lines.append(
        f"Autostop: after {setting.minutes} min with no live run (set by <@{setting.set_by}>)"
        if setting
        else f"Autostop: off (`/runctl autostop {instance_id} <minutes>`, at least {AUTOSTOP_MIN_MINUTES})"
    )
    holder = train_lock(svc.redis, instance_id).holder()
    if holder:
        lines.append(f"Train lock: run `{holder.run_id}` by <@{holder.user_id}>")
    else:
        lines.append("Train lock: free")
    waiting = queued.lines_for(svc, instance_id)
    if waiting:
        lines += [f"Queue ({len(waiting)}):", *waiting]
    return "\n".join(lines)
