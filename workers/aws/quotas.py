"""RunInstances refusals a new account meets, answered with the quota to raise: EC2 counts
running vCPUs per instance family, on-demand and spot apart, per region (Service Quotas)."""

from __future__ import annotations

import re

from botocore.exceptions import ClientError

from workers.aws.boundary import translate
from workers.errors import AwsError, RunctlError

SPOT_ROLE_FIX = (
    "Add `iam:CreateServiceLinkedRole` for `AWSServiceRoleForEC2Spot` to the worker's IAM policy "
    "(docs/security.md, Worker IAM policy), or have an admin create the role once: "
    "`aws iam create-service-linked-role --aws-service-name spot.amazonaws.com`."
)

# family: (on-demand quota name, its code, spot quota name, its code or "" when unverified)
_FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "g": ("Running On-Demand G and VT instances", "L-DB2E81BA", "All G and VT Spot Instance Requests", "L-3819A6DF"),
    "vt": ("Running On-Demand G and VT instances", "L-DB2E81BA", "All G and VT Spot Instance Requests", "L-3819A6DF"),
    "p": ("Running On-Demand P instances", "L-417A185B", "All P Spot Instance Requests", "L-7212CCBC"),
    "inf": ("Running On-Demand Inf instances", "L-1945791B", "All Inf Spot Instance Requests", "L-B5D1601B"),
    "f": ("Running On-Demand F instances", "L-74FC7D96", "All F Spot Instance Requests", "L-88CF9481"),
    "x": ("Running On-Demand X instances", "L-7295265B", "All X Spot Instance Requests", "L-E3A00192"),
    "dl": ("Running On-Demand DL instances", "L-6E869C2A", "All DL Spot Instance Requests", "L-85EED4F7"),
    "trn": ("Running On-Demand Trn instances", "L-2C3B7624", "All Trn Spot Instance Requests", ""),
}
_STANDARD = (
    "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
    "L-1216C47A",
    "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
    "L-34B43A08",
)


def quota_for(instance_type: str, spot: bool) -> tuple[str, str]:
    """(quota name, quota code or "") that counts ``instance_type``'s vCPUs."""
    match = re.match(r"[a-z]+?(?=\d)", instance_type)
    on_name, on_code, spot_name, spot_code = _FAMILIES.get(match.group(0) if match else "", _STANDARD)
    return (spot_name, spot_code) if spot else (on_name, on_code)


def launch_refusal(exc: ClientError, instance_type: str, spot: bool, region: str, vcpus: int | None) -> RunctlError:
    """A RunInstances error that is not capacity: a quota or the Spot role said plainly, else translated."""
    err = exc.response.get("Error", {})
    code, message = str(err.get("Code", "")), str(err.get("Message", ""))
    if code == "AuthFailure.ServiceLinkedRoleCreationNotPermitted" or (
        spot and code.startswith(("AuthFailure", "UnauthorizedOperation")) and "service-linked role" in message
    ):
        return AwsError(
            "AWS refused the first spot launch of this account: the worker may not create the Spot "
            "service-linked role; nothing was launched.",
            code=code,
            why="EC2 creates AWSServiceRoleForEC2Spot on an account's first spot request, with the caller's "
            "`iam:CreateServiceLinkedRole` right.",
            fix=SPOT_ROLE_FIX,
        )
    if code not in ("VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"):
        return translate(exc, f"launch a {instance_type}")
    name, quota = quota_for(instance_type, spot)
    kind = "spot" if spot else "on-demand"
    size = f"a {instance_type} has {vcpus} vCPUs" if vcpus else f"count the vCPUs of a {instance_type}"
    desired = str(vcpus) if vcpus else "<vCPUs>"
    command = (
        f"`aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {quota} "
        f"--desired-value {desired} --region {region}`"
        if quota
        else ""
    )
    return AwsError(
        f"AWS refused the launch: this account's {kind} vCPU quota in {region} for {instance_type} is used up; "
        "nothing was launched.",
        code=code,
        why=f"EC2 counts the vCPUs of all running {kind} instances of a family against the quota “{name}”, "
        "and new accounts start at 0 for GPU families.",
        fix=f"An AWS admin raises “{name}”{f' ({quota})' if quota else ''} in {region}: Service Quotas console → "
        "AWS services → Amazon Elastic Compute Cloud (Amazon EC2) → "
        f"“{name}” → Request increase at account-level"
        + (f", or {command}" if command else "")
        + f" ({size}; ask for what should run at once, plus what already runs). Until then: "
        + ("launch without `--spot` (a separate quota)." if spot else "`--spot` (a separate quota) or another preset."),
    )
