"""Configuration from the environment. Names are public interface (see README)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.errors import ConfigError

Role = Literal["web", "worker", "clock", "socket", "console"]

_REQUIRED: dict[str, tuple[str, ...]] = {
    "web": ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"),
    "socket": ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN"),
    "worker": ("SLACK_BOT_TOKEN", "RUNCTL_REPO", "RUNCTL_S3_BUCKET"),
    "clock": (),
    "console": (),
}


_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_PYTHON = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*|/[A-Za-z0-9_.+/-]+")


def python_path(value: str) -> str:
    """An interpreter: a command name on the instance's PATH or an absolute path."""
    if not _PYTHON.fullmatch(value) or "/../" in f"{value}/":
        raise ValueError(f"expected a command name or an absolute path, e.g. /opt/conda/bin/python, got {value!r}")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    SLACK_BOT_TOKEN: SecretStr | None = None
    SLACK_SIGNING_SECRET: SecretStr | None = None
    SLACK_APP_TOKEN: SecretStr | None = None
    # Signs the run records kept on instances (workers/state/records.py); unset: derived from SLACK_BOT_TOKEN.
    RUNCTL_RECORD_KEY: SecretStr | None = None
    SLACK_API_URL: str | None = None
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    RUNCTL_REPO: str | None = None
    RUNCTL_REF: str = "main"
    RUNCTL_S3_BUCKET: str | None = None
    RUNCTL_REMOTE_ROOT: str = "/opt/runctl"
    RUNCTL_PYTHON: str = "python3"
    RUNCTL_CHANNEL: str | None = None
    RUNCTL_ADMINS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    RUNCTL_SCOPE_TAG: str = "runctl:managed=true"
    # Regions whose instances runctl manages, comma-separated; empty: the worker's own (AWS_DEFAULT_REGION).
    RUNCTL_REGIONS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    RUNCTL_MIRROR_DIR: Path = Path.home() / ".cache" / "runctl" / "mirrors"  # one mirror per RUNCTL_REPO inside
    RUNCTL_STOP_GRACE_SECONDS: int = Field(120, ge=0, le=3600)
    # A multi-node run's c10d rendezvous port on node 0 (torchrun's default); open it between the nodes.
    RUNCTL_RDZV_PORT: int = Field(29500, ge=1024, le=65535)
    RUNCTL_PENDING_WAIT_SECONDS: int = Field(300, ge=0)
    RUNCTL_SWEEP_MINUTES: int = Field(5, ge=1, le=1440)
    RUNCTL_RECONCILE_SECONDS: int = Field(150, ge=1, le=3600)
    RUNCTL_QUICK_WORKERS: int = Field(2, ge=1, le=64)  # work horses for the quick queue only
    RUNCTL_LONG_WORKERS: int = Field(2, ge=1, le=64)  # work horses for long jobs (then quick ones)
    RUNCTL_MONITOR_LEASE_SECONDS: float = Field(180, gt=0)  # a claimed run is polled again after this if its tick died
    RUNCTL_WARN_UPTIME_HOURS: float = Field(24, gt=0)
    RUNCTL_WARN_COST_USD: float = Field(10, gt=0)
    RUNCTL_IDLE_MINUTES: int = Field(60, ge=1)
    RUNCTL_CHECKPOINT_WARN_MINUTES: int = Field(60, ge=1)
    RUNCTL_DIGEST_CRON: str = "0 9 * * *"
    RUNCTL_POLICY_FILE: Path | None = None
    RUNCTL_AUDIT_MAXLEN: int = Field(100_000, ge=100)
    RUNCTL_AUDIT_PER_MINUTE: int = Field(30, ge=1)  # front-door records per user per minute
    RUNCTL_RATE_PER_MINUTE: int = Field(20, ge=1)
    RUNCTL_POLL_MIN_SECONDS: float = Field(5, gt=0)
    RUNCTL_POLL_MAX_SECONDS: float = Field(240, gt=0)
    RUNCTL_LAUNCH_CHECK_SECONDS: float = Field(2, ge=0)
    RUNCTL_LAUNCH_FILE: Path | None = None
    RUNCTL_LAUNCH_POLL_SECONDS: float = Field(5, gt=0)
    RUNCTL_THEN: Literal["stop", "terminate", "keep"] = "keep"
    RUNCTL_AUTOSTOP_MINUTES: int = Field(0, ge=0)
    RUNCTL_AUTOSTOP_HEADSUP_MINUTES: float = Field(10, ge=0)
    RUNCTL_AUTOSTOP_GPU_PERCENT: float = Field(10, ge=0, le=100)
    RUNCTL_GPU_IDLE_PERCENT: float = Field(5, ge=0, le=100)  # a live run's GPUs at or below this are idle
    RUNCTL_GPU_IDLE_MINUTES: int = Field(30, ge=1)  # ... for this long: the sweep asks "stuck or CPU-bound?"
    RUNCTL_SLACK_UPDATE_SECONDS: float = Field(3, ge=0)
    RUNCTL_SLACK_UPDATES_PER_MINUTE: float = Field(40, gt=0)
    # Run events (workers/remote/events.py): unset = off, runs are followed by polling alone.
    RUNCTL_EVENTS_URL: str | None = None
    RUNCTL_EVENTS_PROGRESS_SECONDS: int = Field(15, ge=1, le=3600)
    RUNCTL_EVENTS_PER_MINUTE: int = Field(12, ge=1)  # progress events per run, at /runctl/events
    # Caps over all of an instance's, a user's, and everyone's runs (progress events; exit events
    # have their own per-run budget, bot/events.py): past them, runs are followed by polling.
    RUNCTL_EVENTS_INSTANCE_PER_MINUTE: int = Field(60, ge=1)
    RUNCTL_EVENTS_USER_PER_MINUTE: int = Field(240, ge=1)
    RUNCTL_EVENTS_TOTAL_PER_MINUTE: int = Field(1200, ge=1)

    @field_validator("RUNCTL_REGIONS", mode="before")
    @classmethod
    def _split_regions(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            bad = [r for r in value if not isinstance(r, str) or not _REGION.fullmatch(r)]
            if bad:
                raise ValueError(f"expected AWS region names such as us-east-1,eu-west-1, got {bad!r}")
        return value

    @field_validator("RUNCTL_ADMINS", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("RUNCTL_RECORD_KEY")
    @classmethod
    def _record_key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("expected at least 32 characters, e.g. the output of `openssl rand -hex 32`")
        return value

    @field_validator("RUNCTL_SCOPE_TAG")
    @classmethod
    def _scope_shape(cls, value: str) -> str:
        if value and "=" not in value:
            raise ValueError("expected KEY=VALUE, e.g. runctl:managed=true (empty disables)")
        return value

    @field_validator("RUNCTL_EVENTS_URL")
    @classmethod
    def _events_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s]*)?", value):
            raise ValueError("expected the web process's URL, e.g. https://runctl.example.com/runctl/events")
        return value

    @field_validator("RUNCTL_PYTHON")
    @classmethod
    def _python_shape(cls, value: str) -> str:
        return python_path(value)

    @property
    def scope(self) -> tuple[str, str] | None:
        if not self.RUNCTL_SCOPE_TAG:
            return None
        key, _, value = self.RUNCTL_SCOPE_TAG.partition("=")
        return key, value

    def secret(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{name} is not set")
        return str(value.get_secret_value())

    def require(self, role: Role) -> Settings:
        for name in _REQUIRED[role]:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"runctl: {name} is not set; the {role} process needs it (see README, Settings)")
        return self


def load(role: Role = "console") -> Settings:
    """Load and check settings; any problem is one ConfigError line naming the variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(f"runctl: invalid setting {name}: {err['msg']}") from None
    return settings.require(role)
