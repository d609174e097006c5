"""The worker's IAM policy (docs/security.md) grants every AWS action the code calls: each
boto3 client method, paginator, waiter and presigned method in workers/aws, workers/cost and
workers/jobs, mapped to its IAM action by botocore's own service models. A call added without
its permission fails here, not on the first real launch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import botocore.session
from botocore import xform_name

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"ec2": "ec2", "ssm": "ssm", "s3": "s3", "pricing": "pricing", "iam": "iam", "sts": "sts"}
# Where IAM's action is not the operation's own name (S3's service authorization reference).
AS_AUTHORISED = {
    "s3:HeadObject": "s3:GetObject",
    "s3:HeadBucket": "s3:ListBucket",
    "s3:ListObjectsV2": "s3:ListBucket",
}
# Calls that are not one operation: s3transfer's download, EC2's waiter.
HELPERS = {"download_file": "s3:GetObject", "instance_running": "ec2:DescribeInstances"}
# Authorised without a call of their own: tags given to RunInstances (ec2:CreateTags with
# ec2:CreateAction), the instance profile's role (iam:PassRole), the first spot launch's
# AWSServiceRoleForEC2Spot (iam:CreateServiceLinkedRole).
IMPLIED = {"ec2:CreateTags", "iam:PassRole", "iam:CreateServiceLinkedRole"}


def operations() -> dict[str, set[str]]:
    """Python method name -> the IAM actions of the operations so named."""
    session = botocore.session.get_session()
    found: dict[str, set[str]] = {}
    for service, prefix in SERVICES.items():
        for op in session.get_service_model(service).operation_names:
            action = f"{prefix}:{op}"
            found.setdefault(xform_name(op), set()).add(AS_AUTHORISED.get(action, action))
    return found


def called() -> dict[str, set[str]]:
    """IAM action -> the files whose code calls it."""
    ops = operations()
    found: dict[str, set[str]] = {}
    for folder in ("workers/aws", "workers/cost", "workers/jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            names = re.findall(r"\.([a-z][a-z0-9_]*)\(", text)
            names += re.findall(r'(?:get_paginator|get_waiter)\(\s*"([a-z0-9_]+)"', text)
            names += re.findall(r'presign\([^)]*"([a-z0-9_]+)"', text)  # the method a URL is signed for
            for name in names:
                actions = {HELPERS[name]} if name in HELPERS else ops.get(name, set())
                for action in actions:
                    found.setdefault(action, set()).add(str(path.relative_to(ROOT)))
    return found


def policy_actions() -> set[str]:
    text = (ROOT / "docs" / "security.md").read_text()
    block = text.split("**Worker IAM policy**", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    granted: set[str] = set()
    for statement in json.loads(block)["Statement"]:
        assert statement["Effect"] == "Allow", statement
        action = statement["Action"]
        granted.update([action] if isinstance(action, str) else action)
    return granted


def test_the_policy_grants_every_aws_action_the_code_calls() -> None:
    calls = called()
    assert {"ec2:RunInstances", "ec2:DescribeImages", "ssm:SendCommand", "s3:PutObject"} <= set(calls), calls
    missing = {action: sorted(files) for action, files in calls.items() if action not in policy_actions()}
    assert not missing, f"called but not in docs/security.md's worker policy: {missing}"


def test_the_policy_grants_what_aws_authorises_besides_the_calls() -> None:
    granted = policy_actions()
    needed = IMPLIED | {"ec2:CancelSpotInstanceRequests", "ec2:DescribeImages", "pricing:GetProducts"}
    assert needed <= granted, needed - granted


def test_the_policy_grants_nothing_the_code_never_asks_for() -> None:
    unused = policy_actions() - set(called()) - IMPLIED
    assert not unused, f"in the worker policy, but no code calls it: {sorted(unused)}"
