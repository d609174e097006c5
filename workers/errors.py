"""Typed errors. Every failure a user can meet is one of these, and each carries
what happened, why, and the exact command that fixes it.

    RunctlError
    ├── UsageError              bad command text (grammar)
    ├── ConfigError             a missing or invalid setting
    ├── PermissionDenied        the policy refuses this user
    ├── RateLimited             too many commands from one user
    ├── QueueUnreachable        Redis did not answer the front door in time
    ├── SlackRefused            Slack would not deliver to the conversation
    ├── InstanceError
    │   ├── InstanceNotFound    no such instance (or not visible to us)
    │   ├── NotManaged          outside the bot's tag scope
    │   ├── WrongState          stopped, terminated, pending too long ...
    │   └── AgentOffline        SSM agent not Online
    ├── RunConflict             another training holds the instance
    ├── CodeError
    │   ├── RefNotFound
    │   ├── ScriptNotFound
    │   ├── ScriptSyntaxError
    │   └── GitError        git failed in the worker's mirror of the repository
    ├── RemoteError             a script on the instance failed
    │   ├── RemoteTimeout
    │   └── EnvSetupError       the run's environment could not be built
    └── AwsError                a botocore ClientError, translated at the fleet boundary
        └── Throttled

Errors cross process boundaries as data (``ErrorInfo``), never as exceptions.
"""

from __future__ import annotations

from pydantic import BaseModel

from workers.slack.escape import block, code


class ErrorInfo(BaseModel):
    """An error stored on a run record or job result."""

    kind: str
    what: str
    why: str = ""
    fix: str = ""
    detail: str = ""

    def as_text(self) -> str:
        parts = [f":warning: {self.what}"]
        if self.why:
            parts.append(self.why)
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        if self.detail:
            parts.append(block(self.detail))
        return "\n".join(parts)


class RunctlError(Exception):
    def __init__(self, what: str, *, why: str = "", fix: str = "", detail: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.why = why
        self.fix = fix
        self.detail = detail

    def info(self) -> ErrorInfo:
        return ErrorInfo(kind=type(self).__name__, what=self.what, why=self.why, fix=self.fix, detail=self.detail)

    def as_text(self) -> str:
        return self.info().as_text()


class UsageError(RunctlError):
    def __init__(self, what: str, *, usage: str = "", suggestion: str = "") -> None:
        fix = code(suggestion) if suggestion else ""  # a copyable command built from user text
        super().__init__(what, why=f"Usage: `{usage}`" if usage else "", fix=fix)
        self.usage = usage
        self.suggestion = suggestion


class ConfigError(RunctlError):
    pass


class PermissionDenied(RunctlError):
    pass


class RateLimited(RunctlError):
    pass


class QueueUnreachable(RunctlError):
    pass


class SlackRefused(RunctlError):
    def __init__(self, what: str, *, error: str, why: str = "", fix: str = "") -> None:
        super().__init__(what, why=why, fix=fix)
        self.error = error


class InstanceError(RunctlError):
    def __init__(
        self, what: str, *, why: str = "", fix: str = "", detail: str = "", public: RunctlError | None = None
    ) -> None:
        super().__init__(what, why=why, fix=fix, detail=detail)
        # What a non-admin is told instead, where the detail itself tells too much.
        self.public = public

    def seen_by(self, admin: bool) -> RunctlError:
        return self if admin or self.public is None else self.public


class InstanceNotFound(InstanceError):
    pass


class NotManaged(InstanceError):
    pass


class WrongState(InstanceError):
    def __init__(self, what: str, *, state: str, why: str = "", fix: str = "") -> None:
        super().__init__(what, why=why, fix=fix)
        self.state = state


class AgentOffline(InstanceError):
    pass


class RunConflict(RunctlError):
    pass


class CodeError(RunctlError):
    pass


class RefNotFound(CodeError):
    pass


class ScriptNotFound(CodeError):
    pass


class ScriptSyntaxError(CodeError):
    pass


class GitError(CodeError):
    pass


class RemoteError(RunctlError):
    pass


class RemoteTimeout(RemoteError):
    pass


class EnvSetupError(RemoteError):
    pass


class AwsError(RunctlError):
    def __init__(self, what: str, *, code: str = "", why: str = "", fix: str = "") -> None:
        super().__init__(what, why=why, fix=fix)
        self.code = code


class Throttled(AwsError):
    pass
