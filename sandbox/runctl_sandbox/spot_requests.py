"""Persistent spot requests as EC2 keeps them: RunInstances with a persistent spot option
records a request (moto records none); terminating its instance reopens it and, after
``relaunch_seconds``, EC2 launches a new instance for it, without the request's or the old
instance's tags; CancelSpotInstanceRequests marks it ``cancelled`` (moto forgets it) and
leaves its instance alone."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from moto.ec2.models import ec2_backends
from moto.ec2.models.spot_requests import SpotInstanceRequest

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
                    running = request.instance is not None and str(request.instance.state) != "terminated"
                    request._status_code = "request-canceled-and-instance-running" if running else "canceled"
        return request_ids

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
