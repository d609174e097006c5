"""The AWS boundary: the botocore client configuration, and botocore errors turned into our
own typed errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from workers.errors import AgentOffline, AwsError, InstanceNotFound, RunctlError, Throttled, WrongState

BOTO_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5)


def translate(exc: ClientError | BotoCoreError, action: str) -> RunctlError:
    if isinstance(exc, BotoCoreError):
        return AwsError(
            f"Could not reach AWS while trying to {action}.",
            why=str(exc),
            fix="Check AWS credentials, region and network of the worker.",
        )
    err = exc.response.get("Error", {})
    code, message = str(err.get("Code", "")), str(err.get("Message", ""))
    if code.startswith("InvalidInstanceID"):
        return InstanceNotFound(f"No such instance while trying to {action}.", why=message)
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        return AwsError(
            f"AWS refused to {action}: the worker's IAM role lacks a permission.",
            code=code,
            why=message,
            fix="Add the permission to the worker's IAM policy (docs/security.md, Worker IAM policy).",
        )
    if code in ("Throttling", "ThrottlingException", "RequestLimitExceeded"):
        return Throttled(f"AWS is throttling us while trying to {action}.", code=code, why=message)
    if code == "IncorrectInstanceState":
        return WrongState(f"The instance is in the wrong state to {action}.", state="", why=message)
    if code in ("InvalidInstanceId", "InvalidTarget"):
        return AgentOffline(
            f"SSM cannot reach the instance to {action}.",
            why=message,
            fix="Check that the SSM agent runs and the instance profile has AmazonSSMManagedInstanceCore.",
        )
    return AwsError(f"AWS error while trying to {action}: {code}", code=code, why=message)


@contextmanager
def aws_call(action: str) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, action) from exc
