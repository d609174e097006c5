"""Who may read a run's log (`/runctl logs`, [Full log]): anyone asking in the run's own
channel, where the run already posts (the answer goes to its thread); its owner and the admins
anywhere, privately. Anyone else is refused privately and told where the run lives and who
can read it. A run runctl has no record of has no known owner or channel: admins only."""

from __future__ import annotations

from workers import policy
from workers.commands import Actor
from workers.errors import PermissionDenied
from workers.settings import Settings
from workers.slack.escape import code
from workers.state.runs import Run

WHO = "A run's log is shown in the run's own channel, or privately to its owner and admins"


def in_its_channel(actor: Actor, run: Run) -> bool:
    return bool(run.channel_id) and run.channel_id == actor.channel_id


def check(settings: Settings, actor: Actor, run: Run | None, run_id: str, instance_id: str) -> None:
    """Refuse `actor` the log of run `run_id` (`run`: runctl's record of it, if any)."""
    if policy.is_admin(settings, actor.user_id):
        return
    if run is None:
        raise PermissionDenied(
            f"You can't read the log of run {code(run_id)}: runctl has no record of it, so not whose it is.",
            why=f"{WHO}; a run without a record has neither, so only admins read it.",
            fix="Ask an admin, or `/runctl logs " + instance_id + "` for the newest run runctl knows there.",
        )
    if in_its_channel(actor, run) or actor.user_id == run.user_id:
        return
    direct = run.channel_id.startswith("D")
    where = "a direct message" if direct else (f"<#{run.channel_id}>" if run.channel_id else "no channel")
    ask = f"`/runctl logs {instance_id} --run {run.run_id}` in <#{run.channel_id}>, or ask <@{run.user_id}>"
    raise PermissionDenied(
        f"You can't read the log of run {code(run.run_id)} here: it was started in {where} by <@{run.user_id}>.",
        why=f"{WHO} (<@{run.user_id}>); nothing was shown or posted.",
        fix=f"Ask <@{run.user_id}> or an admin." if direct or not run.channel_id else ask + ".",
    )
