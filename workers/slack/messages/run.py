"""Run messages as Block Kit: one parent message per run, rendered from the run record."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from workers.slack.blocks import sections
from workers.slack.client import MAX_TEXT, clamp
from workers.slack.escape import code, escape
from workers.slack.format import bar, duration, size
from workers.slack.ids import ActionId, BlockId
from workers.slack.messages import Message
from workers.slack.messages.summary import link_buttons
from workers.state.runs import Checkpoint, Gpu, Progress, Run, RunLink, RunState

EMOJI = {
    RunState.QUEUED: ":hourglass_flowing_sand:",
    RunState.STARTING: ":rocket:",
    RunState.SETTING_UP: ":package:",
    RunState.RUNNING: ":arrows_counterclockwise:",
    RunState.STOPPING: ":octagonal_sign:",
    RunState.SUCCEEDED: ":white_check_mark:",
    RunState.FAILED: ":x:",
    RunState.STOPPED: ":double_vertical_bar:",
    RunState.REFUSED: ":no_entry:",
    RunState.LOST: ":grey_question:",
}


def progress_text(p: Progress, final: bool = False) -> str:
    """The bar, where the run is and its first metrics; a final message (`final`) drops
    what only a live run has (the ETA)."""
    parts: list[str] = []
    fraction: float | None = None
    if p.step is not None and p.total_steps:
        fraction = p.step / p.total_steps
    elif p.epoch is not None and p.total_epochs:
        fraction = (p.epoch if p.done_epochs is None else p.done_epochs) / p.total_epochs
    where = ""
    if p.epoch is not None:
        where = f"epoch {p.epoch}/{p.total_epochs}" if p.total_epochs else f"epoch {p.epoch}"
    elif p.step is not None:
        where = f"step {p.step}/{p.total_steps}" if p.total_steps else f"step {p.step}"
    if fraction is not None:
        parts.append(f"`{bar(fraction)}`  {where}".rstrip())
    elif where:
        parts.append(where)
    for name, value in list(p.metrics.items())[:3]:
        parts.append(f"{escape(name)} {value:.4g}")
    if not final and p.eta_seconds is not None and p.eta_seconds > 0:
        parts.append(f"ETA {duration(p.eta_seconds)}")
    if p.source == "log":
        parts.append("_(from training.log)_")
    return "  ·  ".join(parts)


def checkpoint_text(ck: Checkpoint, now: datetime, absolute: bool = False) -> str:
    """`absolute`: when it was saved (a final message never goes stale), else how long ago."""
    epoch = f", epoch {ck.epoch}" if ck.epoch is not None else ""
    if absolute:
        return f"{code(ck.name)} ({size(ck.size)}{epoch}, saved {at_time(ck.modified_at)})"
    age = duration((now - ck.modified_at).total_seconds())
    return f"{code(ck.name)} ({size(ck.size)}{epoch}, {age} ago)"


def at_time(at: datetime) -> str:
    """A date and time each reader sees in their own timezone (UTC as the fallback text)."""
    return f"<!date^{int(at.timestamp())}^{{date_short_pretty}} {{time}}|{at:%Y-%m-%d %H:%M} UTC>"


def gpu_text(gpus: list[Gpu]) -> str:
    """One line for all GPUs: `GPU 0: 87% · 9.8/24.0 GiB`, figures nvidia-smi left out omitted."""

    def one(g: Gpu) -> str:
        parts = [f"{g.utilization:.0f}%"] if g.utilization is not None else []
        if g.memory_used_mib is not None and g.memory_total_mib is not None:
            parts.append(f"{g.memory_used_mib / 1024:.1f}/{g.memory_total_mib / 1024:.1f} GiB")
        return f"GPU {g.index}: " + (" · ".join(parts) or "no figures")

    return "  |  ".join(one(g) for g in gpus)


def node_lines(run: Run) -> list[str]:
    """A multi-node run's nodes, one line each: `node 1 `i-…`: alive · GPU 0: 87% · 9.8/24.0 GiB`."""
    lines = []
    for k, node in enumerate(run.node_states):
        said = (
            f"exited (exit {node.exit_code})" if node.state == "exited" and node.exit_code is not None else node.state
        )
        line = f"node {k} {code(node.instance_id)}: {said}"
        if node.gpus and node.state != "exited":
            line += " · " + gpu_text(node.gpus)
        lines.append(line)
    return lines


def where(run: Run) -> str:
    """The run's instance as people know it: its name beside the id."""
    return f"{escape(run.instance_name)} (`{run.instance_id}`)" if run.instance_name else f"`{run.instance_id}`"


def run_summary(run: Run) -> str:
    return f"{run.state.value}: {code(run.script)} on {where(run)} ({escape(run.run_id)})"


def run_blocks(run: Run, now: datetime | None = None, queued: int = 0) -> Message:
    """`queued`: runs waiting on the instance after this one (shown while it is live)."""
    now = now or datetime.now(UTC)
    head = (
        f"{EMOJI[run.state]} *{run.state.value.capitalize()}* · {code(run.script)} on {where(run)} · <@{run.user_id}>"
    )
    pinned = bool(run.sha) and run.ref == run.sha  # a resumed run trains its sha itself: name it once
    ref = f"ref `{run.sha[:10]}`" if pinned else f"ref {code(run.ref)}" + (f" @ `{run.sha[:10]}`" if run.sha else "")
    details = [f"run {code(run.run_id)}", ref]
    final = run.state.ended
    if run.started_at and final:
        end = run.ended_at or now
        details.append(f"started {at_time(run.started_at)}")
        details.append(f"ended {at_time(end)}")
        details.append(f"took {duration((end - run.started_at).total_seconds())}")
    elif run.started_at:
        details.append(f"elapsed {duration((now - run.started_at).total_seconds())}")
    if final and run.stopped_by:
        verb = "terminated" if run.ended_by == "terminate" else "stopped"
        details.append(f"{verb} by <@{run.stopped_by}>" + (" with `--force`" if run.ended_by == "force" else ""))
    if run.exit_code is not None:
        details.append(f"exit code {run.exit_code}")
    if final and run.outcome is not None and run.outcome.cost:
        details.append(run.outcome.cost)  # escaped when made (workers/jobs/summary.py)
    if run.setup_seconds is not None:
        details.append(f"env ready in {duration(run.setup_seconds)}")
    if queued and not final:
        details.append(f":inbox_tray: {queued} queued after it (`/runctl queue {run.instance_id}`)")
    blocks: list[Block] = [
        SectionBlock(block_id=BlockId.RUN_HEADER, text=MarkdownTextObject(text=clamp(head))),
    ]
    lines: list[str] = []
    if run.progress:
        lines.append(("Last progress: " if final else "") + progress_text(run.progress, final))
    if run.checkpoint:
        lines.append(("Checkpoint: " if final else "Newest checkpoint: ") + checkpoint_text(run.checkpoint, now, final))
    if run.nodes and run.node_states and not final:
        lines += node_lines(run)  # each node's liveness and its own GPUs
    elif run.gpus and not final:
        lines.append(gpu_text(run.gpus))
    if lines:
        blocks.append(
            SectionBlock(block_id=BlockId.RUN_PROGRESS, text=MarkdownTextObject(text=clamp("\n".join(lines))))
        )
    if run.args:
        details.append("args " + code(shlex.join(run.args), 300))  # as typed, shown literally
    blocks.append(
        ContextBlock(
            block_id=BlockId.RUN_DETAILS,
            elements=[MarkdownTextObject(text=clamp(" · ".join(details)))],
        )
    )
    if run.started_at is not None:  # it has a training.log
        blocks.append(full_log_actions(run.run_id, run.outcome.links if final and run.outcome else ()))
    return Message(run_summary(run), blocks)


def full_log_actions(run_id: str, links: Sequence[RunLink] = ()) -> ActionsBlock:
    """[Full log]: the whole training.log attached in the run's thread (workers.jobs.logs);
    then the trackers' link buttons an ended run's log announced (workers/slack/links.py)."""
    button = ButtonElement(text="Full log", action_id=ActionId.FULL_LOG, value=run_id)
    return ActionsBlock(block_id=BlockId.RUN_ACTIONS, elements=[button, *link_buttons(list(links))])


_FENCE = re.compile(r"(```.*?```)", re.DOTALL)


def text_blocks(text: str, max_blocks: int = 10) -> list[Block]:
    """A reply's mrkdwn as sections within Slack's 3,000 characters, a code block never
    split across two (a long one keeps its last lines)."""
    blocks: list[Block] = []
    for part in _FENCE.split(text):
        if not part.strip():
            continue
        if part.startswith("```") and part.endswith("```") and len(part) > 6:
            inner = part[3:-3]
            if len(inner) > MAX_TEXT - 6:
                inner = inner[-(MAX_TEXT - 6) :]
                inner = inner[inner.find("\n") + 1 :]  # whole lines, never half an entity
            blocks.append(SectionBlock(text=MarkdownTextObject(text=f"```{inner}```")))
        else:
            blocks.extend(sections(part.strip("\n").split("\n"), max_blocks))
    return blocks[:max_blocks]
