"""EC2 where moto stops short: the instances' state as SSM sees it, read from moto's backend;
InsufficientInstanceCapacity for a zone made full; one-time spot instances that cannot be
stopped; and StopInstances, TerminateInstances and RebootInstances kill every process
started for those instances, as losing power would; persistent spot requests
(``spot_requests``)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs

from moto.core.utils import utcnow
from moto.ec2.models import ec2_backends
from werkzeug.http import HTTP_STATUS_CODES

from runctl_sandbox import wire
from runctl_sandbox.ec2_launch import LaunchRules, add_ami_root
from runctl_sandbox.network import Network
from runctl_sandbox.spot_requests import SpotRequests
from runctl_sandbox.ssm_agent import kill_instance_processes
from runctl_sandbox.wire import ApiError, RequestContext

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# "offline": ConnectionLost, commands stay Pending until delivery times out;
# "undeliverable": still Online to SSM, but every command ends Undeliverable without running
# (an agent that lost its connection before SSM noticed); "none": not managed by SSM.
SSM_TAG = "sandbox:ssm"
SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
POWER_OFF_ACTIONS = ("StopInstances", "TerminateInstances", "RebootInstances")

_INSTANCE_PARAM = re.compile(r"^InstanceId\.\d+$")
_REQUEST_PARAM = re.compile(r"^SpotInstanceRequestId\.\d+$")
_LAUNCHED = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")


@dataclass(frozen=True)
class Ec2Instance:
    id: str
    state: str
    tags: dict[str, str]
    private_ip: str
    # The policies of its instance profile's roles; None without a profile (the sandbox then
    # stands for an account with Default Host Management Configuration).
    profile_policies: frozenset[str] | None = None
    age: float = float("inf")  # seconds since RunInstances
    # A fresh instance's agent registers this many seconds after launch (real ones take minutes);
    # Sandbox.agent_online_after sets it. 0 by default: the seeded fleet stands for instances that
    # have run for a while, and a console or bench that trains at once must find their agents.
    online_after: ClassVar[float] = 0.0

    @property
    def ssm(self) -> str:
        """``online``, ``offline`` or ``none`` (not registered with SSM)."""
        if self.state != "running" or self.age < Ec2Instance.online_after:
            return "none"
        if self.profile_policies is not None and SSM_CORE_POLICY not in self.profile_policies:
            return "none"  # the agent gets no credentials to register with
        knob = self.tags.get(SSM_TAG, "online")
        return knob if knob in ("offline", "undeliverable", "none") else "online"


def _profile_policies(backend: Any, instance_id: str) -> frozenset[str] | None:
    association = backend.iam_instance_profile_associations.get(instance_id)
    if association is None:
        return None
    roles = association.iam_instance_profile.roles or []
    return frozenset(arn for role in roles for arn in role.managed_policies)


def ec2_instances(account_id: str, region: str) -> dict[str, Ec2Instance]:
    try:
        backend = ec2_backends[account_id][region]
    except KeyError:  # a region moto does not know has no instances
        return {}
    for _ in range(5):
        try:
            return {
                inst.id: Ec2Instance(
                    id=str(inst.id),
                    state=str(inst.state),
                    tags=dict(backend.tags.get(inst.id, {})),
                    private_ip=str(inst.private_ip or ""),
                    profile_policies=_profile_policies(backend, inst.id),
                    age=(utcnow() - inst.launch_time).total_seconds(),
                )
                for inst in backend.all_instances()
            }
        except RuntimeError:  # moto's dicts changed under us (another request thread)
            time.sleep(0.01)
    raise ApiError("InternalServerError", "EC2 state kept changing", 500)


def one_time_spot(account_id: str, region: str, instance_id: str) -> bool:
    """A spot instance whose request is one-time (or unknown: RunInstances' spot
    market options default to one-time) cannot be stopped."""
    try:
        backend = ec2_backends[account_id][region]
        inst = backend.get_instance(instance_id)
    except Exception:  # unknown ids: moto answers for them
        return False
    if getattr(inst, "lifecycle", None) != "spot":
        return False
    for request in list(backend.spot_instance_requests.values()):
        if getattr(request, "instance", None) is not None and request.instance.id == instance_id:
            return str(request.type) != "persistent"
    return True


def _ec2_error(start_response: StartResponse, code: str, message: str, status: int = 400) -> Iterable[bytes]:
    """An error in EC2's query-protocol XML."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()
    headers = [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
    return wire.reply(start_response, f"{status} {HTTP_STATUS_CODES[status]}", headers, body)


class Ec2:
    """The EC2 requests the sandbox answers before (or instead of) moto, the ``app``."""

    def __init__(self, spot: SpotRequests | None = None) -> None:
        # What "now" is for LaunchTime: moto's clock, or the console's (which `--fast` runs ahead).
        self.clock: Callable[[], datetime] = utcnow
        self.exhausted: set[tuple[str, str]] = set()  # (instance type, zone) with no capacity
        self.spot = spot or SpotRequests()
        self.rules = LaunchRules()  # Unsupported zones, account quotas
        self.network = Network()  # private IPs on the loopback, blocked ports
        # "Terminated instances remain visible after termination (for approximately one hour)"
        # (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_TerminateInstances.html);
        # moto keeps them forever, and every Describe and SSM call then scans them all.
        self.terminated_visible_seconds = 3600.0
        self._terminated: dict[tuple[str, str, str], float] = {}  # (account, region, id): when, monotonic

    def _capacity(self, ctx: RequestContext, params: dict[str, list[str]]) -> bytes | None:
        """EC2's InsufficientInstanceCapacity (a 500, "Server." error) for a zone made full
        with ``Sandbox.exhaust``."""
        itype = params.get("InstanceType", [""])[0]
        zone = params.get("Placement.AvailabilityZone", [""])[0]
        subnet = params.get("SubnetId", [""])[0]
        if subnet:
            try:
                zone = str(ec2_backends[ctx.account_id][ctx.region].get_subnet(subnet).availability_zone)
            except Exception:  # moto answers for an unknown subnet itself
                return None
        zone = zone or ctx.region + "a"
        if (itype, zone) not in self.exhausted:
            return None
        message = (
            f"We currently do not have sufficient {itype} capacity in the Availability Zone you requested "
            f"({zone}). Our system will be working on provisioning additional capacity."
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity'
            f"</Code><Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()

    def handle(
        self, app: WSGIApplication, environ: WSGIEnvironment, ctx: RequestContext, start_response: StartResponse
    ) -> Iterable[bytes]:
        body = wire.read_body(environ)
        params = parse_qs(environ.get("QUERY_STRING", "")) | parse_qs(body.decode("utf-8", "replace"))
        action = params.get("Action", [""])[0]
        if action == "RunInstances":
            refusal = self._capacity(ctx, params)
            if refusal is not None:
                return wire.reply(start_response, "500 Internal Server Error", [("Content-Type", "text/xml")], refusal)
            refused = self.rules.refusal(ctx, params)
            if refused is not None:
                return _ec2_error(start_response, *refused)
        if action == "StopInstances":
            for iid in (v[0] for k, v in params.items() if _INSTANCE_PARAM.match(k)):
                if one_time_spot(ctx.account_id, ctx.region, iid):
                    return _ec2_error(
                        start_response,
                        "UnsupportedOperation",
                        f"You can't stop the Spot Instance '{iid}' because it is associated with a one-time "
                        "Spot Instance request. You can only stop Spot Instances associated with persistent "
                        "Spot Instance requests.",
                    )
        if action == "CancelSpotInstanceRequests":
            return self._cancel(ctx, params, start_response)
        status, headers, reply = wire.call_app(app, environ)
        if action == "RunInstances" and status.startswith("200"):
            add_ami_root(ctx, params, reply)
        if action == "StartInstances" and status.startswith("200"):
            self._relaunched(ctx, [v[0] for k, v in params.items() if _INSTANCE_PARAM.match(k)])
        if action in POWER_OFF_ACTIONS and status.startswith("200"):
            ids = [v[0] for k, v in params.items() if _INSTANCE_PARAM.match(k)]
            kill_instance_processes(ids)
            if action == "TerminateInstances":
                self.spot.terminated(ctx, ids)
                self._forget_terminated(ctx, ids)
        if action == "RunInstances" and status.startswith("200"):
            self.network.assign(ctx.account_id, ctx.region, [m.decode() for m in _LAUNCHED.findall(reply)])
            self.spot.adopt(ctx, params, [m.decode() for m in _LAUNCHED.findall(reply)])
        return wire.reply(start_response, status, headers, reply)

    def _forget_terminated(self, ctx: RequestContext, ids: list[str]) -> None:
        """Record when `ids` were terminated, and drop those terminated longer ago than
        terminated_visible_seconds from moto's backend (and their tags), as EC2 does."""
        now = time.monotonic()
        for iid in ids:
            self._terminated.setdefault((ctx.account_id, ctx.region, iid), now)
        gone = {key for key, when in self._terminated.items() if now - when > self.terminated_visible_seconds}
        if not gone:
            return
        for account, region in {(a, r) for a, r, _ in gone}:
            backend = ec2_backends[account][region]
            ids_gone = {i for a, r, i in gone if (a, r) == (account, region)}
            for rid, reservation in list(backend.reservations.items()):
                kept = [i for i in reservation.instances if i.id not in ids_gone or i.state != "terminated"]
                if len(kept) == len(reservation.instances):
                    continue
                if kept:
                    reservation.instances = kept
                else:
                    backend.reservations.pop(rid, None)
            for iid in ids_gone:
                backend.tags.pop(iid, None)
        for key in gone:
            del self._terminated[key]

    def _relaunched(self, ctx: RequestContext, ids: list[str]) -> None:
        """Real EC2 resets LaunchTime on every start: "The time that the instance was last
        launched" (boto3's EC2.Instance.launch_time, https://boto3.amazonaws.com/v1/documentation/api/
        1.39.0/reference/services/ec2/instance/launch_time.html); moto keeps the first launch's."""
        backend = ec2_backends[ctx.account_id][ctx.region]
        now = self.clock()
        now = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now  # moto keeps naive UTC
        for iid in ids:
            try:
                backend.get_instance(iid).launch_time = now
            except Exception:  # moto answered for an unknown instance itself
                continue

    def _cancel(
        self, ctx: RequestContext, params: dict[str, list[str]], start_response: StartResponse
    ) -> Iterable[bytes]:
        """CancelSpotInstanceRequests as EC2 answers it (moto forgets the request instead)."""
        ids = [v[0] for k, v in sorted(params.items()) if _REQUEST_PARAM.match(k)]
        done = self.spot.cancel(ctx, ids)
        if isinstance(done, str):
            return _ec2_error(
                start_response,
                "InvalidSpotInstanceRequestID.NotFound",
                f"The spot instance request ID '{done}' does not exist",
            )
        items = "".join(
            f"<item><spotInstanceRequestId>{rid}</spotInstanceRequestId><state>cancelled</state></item>" for rid in done
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<CancelSpotInstanceRequestsResponse '
            f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}</requestId>'
            f"<spotInstanceRequestSet>{items}</spotInstanceRequestSet></CancelSpotInstanceRequestsResponse>"
        ).encode()
        headers = [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
        return wire.reply(start_response, "200 OK", headers, body)
