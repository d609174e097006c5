"""RunInstances as a real account answers where moto does not: a type a zone does not offer
(`Unsupported`), account quotas (`VcpuLimitExceeded`, `MaxSpotInstanceCountExceeded`), the
first spot launch without the right to create the Spot service-linked role, and a block-device
mapping that names another device than the AMI's root: EC2 then adds a second volume and the
root keeps the AMI's size."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from moto.ec2.models import ec2_backends

from runctl_sandbox.wire import RequestContext

SPOT_ONLY = ("MaxSpotInstanceCountExceeded", "AuthFailure.ServiceLinkedRoleCreationNotPermitted")
ACCOUNT_CODES = ("VcpuLimitExceeded", *SPOT_ONLY)

_MESSAGES = {
    "VcpuLimitExceeded": "You have requested more vCPU capacity than your current vCPU limit of 0 allows for the "
    "instance bucket that the specified instance type belongs to. Please visit "
    "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.",
    "MaxSpotInstanceCountExceeded": "Max spot instance count exceeded",
    "AuthFailure.ServiceLinkedRoleCreationNotPermitted": "The provided credentials do not have permission to "
    "create the service-linked role for EC2 Spot Instances.",
}
_DEVICE = re.compile(r"^BlockDeviceMapping\.\d+\.DeviceName$")
_INSTANCE_ID = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")


class LaunchRules:
    def __init__(self) -> None:
        self.unsupported: set[tuple[str, str]] = set()  # (instance type, zone) not offered
        self.account: set[str] = set()  # ACCOUNT_CODES the account answers

    def refusal(self, ctx: RequestContext, params: dict[str, list[str]]) -> tuple[str, str] | None:
        """(code, message) RunInstances answers instead of launching, or None."""
        itype = params.get("InstanceType", [""])[0]
        spot = params.get("InstanceMarketOptions.MarketType", [""])[0] == "spot"
        for code in ACCOUNT_CODES:
            if code in self.account and spot == (code in SPOT_ONLY):
                return code, _MESSAGES[code]
        zone = _zone(ctx, params)
        if zone and (itype, zone) in self.unsupported:
            return "Unsupported", (
                f"Your requested instance type ({itype}) is not supported in your requested Availability Zone "
                f"({zone}). Please retry your request by not specifying an Availability Zone."
            )
        return None


def _zone(ctx: RequestContext, params: dict[str, list[str]]) -> str:
    zone = params.get("Placement.AvailabilityZone", [""])[0]
    subnet = params.get("SubnetId", [""])[0]
    if subnet:
        try:
            zone = str(ec2_backends[ctx.account_id][ctx.region].get_subnet(subnet).availability_zone)
        except Exception:  # moto answers for an unknown subnet itself
            return ""
    return zone or ctx.region + "a"


def add_ami_root(ctx: RequestContext, params: dict[str, list[str]], reply: bytes) -> None:
    """After a RunInstances whose mapping leaves out the AMI's root device: the root volume at
    the AMI's size, tagged like the launch's other volumes (moto creates only the mapped ones)."""
    mapped = {v[0] for k, v in params.items() if _DEVICE.match(k)}
    if not mapped:
        return  # moto's own default root stands
    backend: Any = ec2_backends[ctx.account_id][ctx.region]
    for raw in _INSTANCE_ID.findall(reply):
        inst = backend.get_instance(raw.decode())
        root = str(inst.root_device_name)
        if root in mapped or root in dict(inst.get_block_device_mapping):
            continue  # mapped, or a ClientToken's repeat of a launch that has it
        size = 8  # moto's default root, for an AMI it no longer knows
        with contextlib.suppress(Exception):
            size = int(
                backend.describe_images(ami_ids=[inst.image_id])[0].block_device_mappings[0]["Ebs"]["VolumeSize"]
            )
        tags: dict[str, str] = {}
        for _, device in inst.get_block_device_mapping:
            tags |= dict(backend.tags.get(device.volume_id, {}))
        volume = backend.create_volume(size=size, zone_name=inst._placement.zone, volume_type="gp2")
        if tags:
            backend.create_tags([volume.id], tags)
        backend.attach_volume(volume.id, inst.id, root, True)
