"""Before an instance of a persistent spot request goes: cancel the request, or EC2 launches a
new instance for it (without runctl's tags, so runctl never sees it, and it bills)."""

from __future__ import annotations

from workers.aws.instance import Instance
from workers.errors import AwsError, RunctlError
from workers.services import Services


def console_fix(inst: Instance, request_ids: list[str]) -> str:
    """The AWS CLI and console steps that cancel the request(s) by hand."""
    if request_ids:
        cli = (
            f"`aws ec2 cancel-spot-instance-requests --region {inst.region} "
            f"--spot-instance-request-ids {' '.join(request_ids)}`"
        )
    else:
        cli = (
            f"`aws ec2 describe-spot-instance-requests --region {inst.region} "
            f"--filters Name=instance-id,Values={inst.id}` gives its id, then "
            f"`aws ec2 cancel-spot-instance-requests --region {inst.region} --spot-instance-request-ids <id>`"
        )
    return f"{cli} (console: EC2 › Spot Requests › select it › Actions › Cancel request)"


class NotCancelled(Exception):
    def __init__(self, ids: list[str], error: RunctlError) -> None:
        super().__init__(error.what)
        self.ids, self.error = ids, error


def cancel(svc: Services, inst: Instance) -> list[str]:
    """The live spot requests of `inst`, cancelled ([] for none, or an on-demand instance);
    NotCancelled with the ids found so far when AWS refused."""
    if inst.lifecycle != "spot":
        return []
    ids: list[str] = []
    try:
        ids = svc.fleet.live_spot_requests(inst.id)
        if ids:
            svc.fleet.cancel_spot_requests(inst.id, ids)
    except RunctlError as exc:
        raise NotCancelled(ids, exc) from exc
    return ids


def cancel_for(svc: Services, inst: Instance, doing: str) -> str:
    """Cancel the live spot request(s) of `inst` before `doing` it; the line that says so ('' when
    it has none). An AwsError with the fix when they could not be cancelled: `doing` must not go on."""
    try:
        ids = cancel(svc, inst)
    except NotCancelled as failed:
        exc = failed.error
        named = f"`{', '.join(failed.ids)}`" if failed.ids else "(its id unknown)"
        raise AwsError(
            f":rotating_light: {inst.label} was not {doing}: its spot request {named} could not be cancelled "
            f"({exc.what}{' ' + exc.why if exc.why else ''}). A persistent spot request outlives its instance: EC2 "
            "would launch a new instance for it, without runctl's tags, that runctl never sees and that bills.",
            fix=f"give the worker's IAM role `ec2:DescribeSpotInstanceRequests` and `ec2:CancelSpotInstanceRequests` "
            f"(docs/security.md, Worker IAM policy), or cancel it yourself: {console_fix(inst, failed.ids)}; "
            f"then `/runctl terminate {inst.id}` again.",
        ) from exc
    if not ids:
        return ""
    return (
        f":no_entry_sign: Its spot request `{', '.join(ids)}` was cancelled first: EC2 launches no new instance for it."
    )


def after_interruption(svc: Services, old: Instance) -> str:
    """The run goes on elsewhere: cancel the interrupted instance's request, or EC2 restarts it
    (a stop-type interruption) when capacity returns and it bills beside the replacement."""
    try:
        ids = cancel(svc, old)
    except NotCancelled as failed:
        return (
            f":rotating_light: EC2 will restart the interrupted {old.label} when spot capacity returns, and from "
            f"then it bills beside the replacement: its spot request could not be cancelled ({failed.error.what}). "
            f"Fix: `/runctl terminate {old.id}` once you no longer need its disk, or cancel the request: "
            f"{console_fix(old, failed.ids)}."
        )
    if not ids:
        return ""
    return (
        f":no_entry_sign: The spot request `{', '.join(ids)}` of the interrupted {old.label} was cancelled, so EC2 "
        f"will not restart it; its disk bills until `/runctl terminate {old.id}` (EC2 terminates it with the cancel "
        "if it had already stopped it)."
    )
