"""Persistent spot requests as EC2 keeps them: RunInstances with a persistent spot option
records a request (moto records none); terminating its instance reopens it and, after
``relaunch_seconds``, EC2 launches a new instance for it, without the request's or the old
instance's tags; CancelSpotInstanceRequests marks it ``cancelled`` (moto forgets it) and
leaves a running instance alone.

An interruption (``interrupt``), as the EC2 user guide describes it ("Spot Instance
interruption notices"; "Behavior of Spot Instance interruptions"): the notice (raised in the
IMDS by the caller) gives two minutes, scaled here to ``after`` seconds; then EC2 stops the
instance (``stop``: its EBS volumes are kept and only they bill; the request is ``disabled``)
or terminates it. "Only Amazon EC2 can restart an interrupted stopped Spot Instance": it does,
``restart_after`` seconds later (capacity returned), for a persistent request still disabled;
"If you cancel a Spot Instance request ... Amazon EC2 terminates any associated Spot Instances
that are stopped". (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/interruption-behavior.html)"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from moto.ec2.models import ec2_backends
from moto.ec2.models.spot_requests import SpotInstanceRequest

from runctl_sandbox.ssm_agent import kill_instance_processes
from runctl_sandbox.wire import RequestContext

LIVE = ("open", "active", "disabled")  # the states CancelSpotInstanceRequests accepts


class _Adopted(SpotInstanceRequest):
    """A request for an instance RunInstances already launched (moto's constructor launches one)."""

    def __init__(self, adopt: Any, *args: Any) -> None:
        self.adopt = adopt
        super().__init__(*args)

    def launch_instance(self) -> Any:
        if self.adopt is not None:
            inst, self.adopt = self.adopt, None
            return inst
        return super().launch_instance()


class SpotRequests:
    def __init__(self, relaunch_seconds: float = 1.0) -> None:
        self.relaunch_seconds = relaunch_seconds
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()

    def adopt(self, ctx: RequestContext, params: dict[str, list[str]], instance_ids: list[str]) -> None:
        """After a RunInstances with SpotInstanceType=persistent: one request per instance."""
        prefix = "InstanceMarketOptions.SpotOptions."
        if params.get(prefix + "SpotInstanceType", [""])[0] != "persistent":
            return
        behaviour = params.get(prefix + "InstanceInterruptionBehavior", ["terminate"])[0]
        backend = ec2_backends[ctx.account_id][ctx.region]
        for iid in instance_ids:
            inst = backend.get_instance(iid)
            request = _Adopted(
                inst,
                backend,
                f"sir-{uuid.uuid4().hex[:8]}",
                "",
                str(inst.image_id),
                "persistent",
                None,
                None,
                None,
                None,
                "",
                [],
                None,
                str(inst.instance_type),
                None,
                None,
                None,
                False,
                str(inst.subnet_id or ""),
                {},
                None,
                behaviour,
            )
            backend.spot_instance_requests[request.id] = request

    def cancel(self, ctx: RequestContext, request_ids: list[str]) -> list[str] | str:
        """The ids cancelled, or the first unknown id (AWS: InvalidSpotInstanceRequestID.NotFound)."""
        backend = ec2_backends[ctx.account_id][ctx.region]
        with self._lock:
            for rid in request_ids:
                if rid not in backend.spot_instance_requests:
                    return rid
            for rid in request_ids:
                request = backend.spot_instance_requests[rid]
                if request.state in LIVE:
                    request.state = "cancelled"
                    inst = request.instance
                    if inst is not None and str(inst.state) == "stopped":  # AWS terminates it
                        backend.terminate_instances([inst.id])
                    running = inst is not None and str(inst.state) != "terminated"
                    request._status_code = "request-canceled-and-instance-running" if running else "canceled"
        return request_ids

    def interrupt(
        self,
        account_id: str,
        region: str,
        instance_id: str,
        action: str,
        after: float,
        restart_after: float | None,
        restarted: Callable[[], None] = lambda: None,
    ) -> None:
        """EC2 takes the instance ``after`` seconds from now (the notice's two minutes, scaled):
        ``stop`` or ``terminate``; a stopped one is restarted ``restart_after`` seconds later
        (then ``restarted`` is called: the notice is withdrawn)."""
        self._later(after, self._take, account_id, region, instance_id, action, restart_after, restarted)

    def _later(self, seconds: float, func: Any, *args: Any) -> None:
        timer = threading.Timer(seconds, func, args)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _request_of(self, backend: Any, instance_id: str) -> Any:
        for request in list(backend.spot_instance_requests.values()):
            inst = getattr(request, "instance", None)
            if inst is not None and inst.id == instance_id:
                return request
        return None

    def _take(
        self,
        account_id: str,
        region: str,
        instance_id: str,
        action: str,
        restart_after: float | None,
        restarted: Callable[[], None],
    ) -> None:
        backend = ec2_backends[account_id][region]
        with self._lock:
            self._timers.discard(threading.current_thread())
            inst = backend.get_instance(instance_id)
            if str(inst.state) != "running":
                return
            request = self._request_of(backend, instance_id)
            kill_instance_processes([instance_id])  # as losing power would
            if action == "terminate":
                backend.terminate_instances([instance_id])
                return
            backend.stop_instances([instance_id])
            if request is None or request.type != "persistent":
                return
            request.state, request._status_code = "disabled", "instance-stopped-no-capacity"
        if restart_after is not None:
            self._later(restart_after, self._restart, account_id, region, instance_id, restarted)

    def _restart(self, account_id: str, region: str, instance_id: str, restarted: Callable[[], None]) -> None:
        backend = ec2_backends[account_id][region]
        with self._lock:
            self._timers.discard(threading.current_thread())
            request = self._request_of(backend, instance_id)
            if request is None or request.state != "disabled":  # cancelled meanwhile: terminated with it
                return
            restarted()
            backend.start_instances([instance_id])
            request.state, request._status_code = "active", "fulfilled"

    def terminated(self, ctx: RequestContext, instance_ids: list[str]) -> None:
        """TerminateInstances succeeded: each persistent request of those instances reopens and
        is fulfilled again after ``relaunch_seconds``, unless cancelled meanwhile."""
        backend = ec2_backends[ctx.account_id][ctx.region]
        for request in list(backend.spot_instance_requests.values()):
            inst = getattr(request, "instance", None)
            if request.type != "persistent" or request.state not in LIVE or inst is None or inst.id not in instance_ids:
                continue
            request.state, request._status_code = "open", "instance-terminated-by-user"
            timer = threading.Timer(self.relaunch_seconds, self._fulfil, (request,))
            timer.daemon = True
            with self._lock:
                self._timers.add(timer)
            timer.start()

    def _fulfil(self, request: Any) -> None:
        with self._lock:
            self._timers.discard(threading.current_thread())
            if request.state != "open":
                return
            request.all_tags = {}  # the instances a request launches carry none of its tags
            request.instance = request.launch_instance()
            request.state, request._status_code = "active", "fulfilled"

    def shutdown(self) -> None:
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
