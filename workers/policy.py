"""Who may do what, where.

The policy comes from ``RUNCTL_POLICY_FILE`` (TOML or YAML) when it is set, and is
re-read whenever the file changes (cached by mtime), so an edit takes effect on the
next check. Without a file, the default applies:

- everyone may ``train``, ``status``, ``resources``, ``checkpoints``, ``logs`` and ``chart``;
- ``stop`` and ``start`` are for the instance's owner or admins (see ``owner``);
- ``terminate``, ``force`` and ``audit`` are for admins;
- admins come from ``RUNCTL_ADMINS``; any channel; scope ``RUNCTL_SCOPE_TAG``.

A policy file (every key optional; unknown keys are errors)::

    admins = ["U0ADMIN", "S0PLATFORM"]      # added to RUNCTL_ADMINS; S… = a user group
    channels = ["C0TRAIN"]                  # where commands are accepted; empty = anywhere
    scope = "runctl:managed=true"           # instance tag filter; default RUNCTL_SCOPE_TAG
    queue_limit = 3                         # queued runs per person (0: no limit)
    [roles]
    ml = ["U0ALICE", "S0MLTEAM"]
    [commands]                              # roles per command; built-ins: everyone, owner, admin
    train = ["ml", "admin"]
    stop = ["owner", "ml", "admin"]
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from redis import Redis

from workers import commands
from workers.commands import Actor
from workers.errors import ConfigError, PermissionDenied
from workers.settings import Settings
from workers.slack import usergroups
from workers.state.runs import Run, RunState, RunStore

log = logging.getLogger(__name__)

Action = Literal[
    "train",
    "status",
    "resources",
    "checkpoints",
    "logs",
    "chart",
    "backup",
    "stop",
    "start",
    "terminate",
    "force",
    "audit",
    "launch",
    "autostop",
    "resume",  # [Resume training], against the stopped run's owner
    "snooze",  # a cost warning's [Snooze 24h]
    "keep",  # a cost warning's [Keep running]
    "queue",
]
EVERYONE, OWNER, ADMIN = "everyone", "owner", "admin"
OWNER_TAG = "runctl:user"  # the instance tag naming its owner when no run does
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,20}")  # a Slack user id; anyone who may tag an instance may write the tag
BUILTIN_ROLES = (EVERYONE, OWNER, ADMIN)
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = {
    "train": (EVERYONE,),
    "status": (EVERYONE,),
    "resources": (EVERYONE,),
    "checkpoints": (EVERYONE,),
    "logs": (EVERYONE,),
    "chart": (EVERYONE,),  # and who may read the run's log (workers/jobs/log_access.py)
    "backup": (EVERYONE,),  # copies to S3; deletes nothing
    "help": (EVERYONE,),
    "stop": (OWNER, ADMIN),
    "start": (OWNER, ADMIN),
    "terminate": (ADMIN,),
    "force": (ADMIN,),
    "audit": (ADMIN,),
    "launch": (EVERYONE,),  # within the caps of RUNCTL_LAUNCH_FILE
    "autostop": (OWNER, ADMIN),
    "resume": (OWNER, ADMIN),
    "snooze": (OWNER, ADMIN),
    "keep": (OWNER, ADMIN),
    "queue": (EVERYONE,),  # lists; cancelling is the requester's or an admin's (workers/jobs/queued.py)
}
FALLBACK_ROLES = (OWNER, ADMIN)  # an action no table lists

MemberId = Annotated[str, Field(pattern=r"^[UWS][A-Z0-9]{2,}$")]
ChannelId = Annotated[str, Field(pattern=r"^[CGD][A-Z0-9]{2,}$")]


class Policy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    admins: tuple[MemberId, ...] = ()
    channels: tuple[ChannelId, ...] = ()
    scope: str | None = None
    roles: dict[str, tuple[MemberId, ...]] = Field(default_factory=dict)
    commands: dict[Action, tuple[str, ...]] = Field(default_factory=dict)
    queue_limit: int = Field(3, ge=0, le=1000)  # queued runs per person (issue 27); 0: no limit

    @field_validator("scope")
    @classmethod
    def _scope_shape(cls, value: str | None) -> str | None:
        if value and "=" not in value:
            raise ValueError("expected KEY=VALUE, e.g. runctl:managed=true (empty disables)")
        return value

    @field_validator("roles")
    @classmethod
    def _no_builtin_redefinition(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        clash = sorted(set(value) & set(BUILTIN_ROLES))
        if clash:
            raise ValueError(f"role {clash[0]!r} is built in; list admins under `admins`")
        return value

    @model_validator(mode="after")
    def _roles_exist(self) -> Policy:
        for action, roles in self.commands.items():
            for role in roles:
                if role not in self.roles and role not in BUILTIN_ROLES:
                    known = ", ".join([*BUILTIN_ROLES, *self.roles])
                    raise ValueError(f"commands.{action} names role {role!r}, which is not defined (known: {known})")
        return self

    def roles_for(self, action: str) -> tuple[str, ...]:
        listed: tuple[str, ...] | None = self.commands.get(action)  # type: ignore[call-overload]
        if listed is not None:
            return listed
        return DEFAULT_COMMANDS.get(action, FALLBACK_ROLES)


# --- loading -----------------------------------------------------------------

_cache: dict[Path, tuple[tuple[int, int], Policy]] = {}
_cache_lock = threading.Lock()


_DEFAULT = Policy()


def load(settings: Settings) -> Policy:
    """The current policy: the file's (re-read when it changed) or the default."""
    path = settings.RUNCTL_POLICY_FILE
    if path is None:
        return _DEFAULT  # one instance: a front-door check loads the policy 4 times (issue 28)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"The policy file {path} cannot be read ({exc.strerror}).",
            why="RUNCTL_POLICY_FILE points at it; runctl refuses every command rather than guess a policy.",
            fix=f"Create {path}, or unset RUNCTL_POLICY_FILE to use the default policy.",
        ) from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        cached = _cache.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
    policy = parse(path)
    with _cache_lock:
        _cache[path] = (stamp, policy)
    return policy


def parse(path: Path) -> Policy:
    """Read and validate a policy file; any problem is one ConfigError naming the key."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data: Any = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "TOML"
        raise _invalid(path, f"it is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid(path, "its top level must be a table/mapping")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "policy"
        raise _invalid(path, f"{where}: {err['msg']}") from None


def _invalid(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"The policy file {path} is invalid, so runctl refuses commands until it is fixed.",
        why=why,
        fix=f"Fix {path} (the format is in docs/security.md, Default policy); the change takes effect immediately.",
    )


def scope(settings: Settings) -> tuple[str, str] | None:
    """The instance scope tag: the policy file's, else RUNCTL_SCOPE_TAG."""
    tag = load(settings).scope
    if tag is None:
        return settings.scope
    if not tag:
        return None
    key, _, value = tag.partition("=")
    return key, value


def admins(settings: Settings) -> list[str]:
    """Admin user and group ids: RUNCTL_ADMINS plus the policy file's."""
    ids = list(settings.RUNCTL_ADMINS)
    for member in _safe_policy(settings).admins:
        if member not in ids:
            ids.append(member)
    return ids


def admin_users(settings: Settings) -> list[str]:
    """The admins as people to write to: user ids, each user group's members in its place."""
    users: list[str] = []
    for member in admins(settings):
        group = sorted(usergroups.members(settings, member)) if member.startswith("S") else [member]
        users += [u for u in group if u not in users]
    return users


def _safe_policy(settings: Settings) -> Policy:
    try:
        return load(settings)
    except ConfigError:
        return Policy()


def _is_member(settings: Settings, user_id: str, members: Iterable[str]) -> bool:
    for member in members:
        if member == user_id:
            return True
        if member.startswith("S") and user_id in usergroups.members(settings, member):
            return True
    return False


# --- checks ----------------------------------------------------------------------


def allowed(settings: Settings, user_id: str, action: str, owner_id: str | None = None) -> bool:
    try:
        check(settings, user_id, action, owner_id)
    except PermissionDenied:
        return False
    return True


def check(
    settings: Settings, user_id: str, action: str, owner_id: str | None = None, *, defer_owner: bool = False
) -> None:
    """Raise PermissionDenied unless user_id may perform action.

    owner_id is the owner of what the action touches (``owner``, ``owner_of``); ``owner``
    is satisfied only when it is the user: None means nobody owns it, so only the other
    roles (admins) pass. ``defer_owner``: the caller cannot know the owner (the bot reads
    no EC2 tags), so ``owner`` passes here and the worker's check decides. A broken
    policy file raises ConfigError: it refuses rather than guess."""
    policy = load(settings)
    roles = policy.roles_for(action)
    admin_ids = admins(settings)
    for role in roles:
        if role == EVERYONE:
            return
        if role == OWNER and (defer_owner or (owner_id is not None and owner_id == user_id)):
            return
        if role == ADMIN and _is_member(settings, user_id, admin_ids):
            return
        if role in policy.roles and _is_member(settings, user_id, policy.roles[role]):
            return
    raise PermissionDenied(
        f"You can't `{action}` here: it needs {_describe(roles, owner_id)}.",
        why=f"Admins: {_mentions(admin_ids) or 'nobody yet (set RUNCTL_ADMINS)'}." + usergroups.trouble(),
        fix="Ask an admin to do it, or to add you to "
        + (
            f"role `{_named_role(roles)}` in the policy file ({settings.RUNCTL_POLICY_FILE})"
            if settings.RUNCTL_POLICY_FILE and _named_role(roles)
            else "RUNCTL_ADMINS or the policy file (RUNCTL_POLICY_FILE)"
        )
        + ".",
    )


def check_channel(settings: Settings, channel_id: str) -> None:
    channels = load(settings).channels
    if channels and channel_id not in channels:
        where = ", ".join(f"<#{c}>" for c in channels)
        raise PermissionDenied(
            "runctl does not take commands in this channel.",
            why=f"The policy allows commands only in {where}.",
            fix=f"Run it in {where}, or ask an admin ({_mentions(admins(settings)) or 'set RUNCTL_ADMINS'}) "
            "to add this channel to `channels` in the policy file.",
        )


def actions(command: commands.Command, default_then: str = "keep") -> list[str]:
    """The policy actions a command needs: its own, plus `force` when it asks for it, plus
    what its consequences need (a train's `--then stop|terminate`, RUNCTL_THEN when not given)."""
    if isinstance(command, commands.HelpCommand):
        return []
    if isinstance(command, commands.ResumeCommand):
        return ["train"]  # and the flow checks `resume` against the run's owner, as [Resume training] does
    needed: list[str] = [command.name]
    if getattr(command, "force", False):
        needed.append("force")
    then = consequence(command, default_then)
    if then is not None:
        needed.append(then)
    return needed


def consequence(command: commands.Command, default_then: str = "keep") -> str | None:
    """What a train does to its instance when the run ends, when that is an action of its own."""
    if not isinstance(command, commands.TrainCommand):
        return None
    then = command.then or default_then
    return then if then in ("stop", "terminate") else None


def check_command(
    settings: Settings,
    user_id: str,
    command: commands.Command,
    owner_id: str | None = None,
    *,
    defer_owner: bool = False,
) -> None:
    """Every action `command` needs (`actions`); a refused `--then` says how to train without it."""
    then = consequence(command, settings.RUNCTL_THEN)
    for action in actions(command, settings.RUNCTL_THEN):
        whose = owner_id
        if action == then and owner_id is None and not defer_owner:
            whose = user_id  # nobody owns it: the run makes its requester the owner before `--then` acts
        try:
            check(settings, user_id, action, whose, defer_owner=defer_owner)
        except PermissionDenied as exc:
            if action != then:
                raise
            iid = getattr(command, "instance_id", "")
            given = "" if getattr(command, "then", None) else f" (RUNCTL_THEN is `{then}` here)"
            raise PermissionDenied(
                f"You can't train on `{iid}` with `--then {then}`{given}: when the run ends it would `{then}` "
                f"the instance, and `{then}` needs {_describe(load(settings).roles_for(then), whose)}.",
                why=exc.why,
                fix=f"Send the command again with `--then keep` (the instance keeps running after the run), "
                f"or ask {'its owner or ' if OWNER in load(settings).roles_for(then) else ''}an admin "
                f"to `/runctl {then} {iid}` when it is done.",
            ) from None


def recheck_command(settings: Settings, actor: Actor, command: commands.Command, owner_id: str | None) -> None:
    """The worker's check of a queued command just before it runs: channel, then `check_command`."""
    if actor.channel_id:
        check_channel(settings, actor.channel_id)
    check_command(settings, actor.user_id, command, owner_id)


def who_may(settings: Settings, action: str, owner_id: str | None) -> str:
    """Who may do `action` to what `owner_id` owns, in words, admins named."""
    admin_ids = _mentions(admins(settings)) or "none yet"
    return f"{_describe(_safe_policy(settings).roles_for(action), owner_id)} (admins: {admin_ids})"


def owner(live: Run | None, history: Iterable[Run], tags: Mapping[str, str] | None) -> str | None:
    """The owner rule: who started the live run, else the last run (newest first in
    `history`; one that took the train lock, never one refused in pre-flight), else the
    `runctl:user` tag, else nobody (None: admins only)."""
    if live is not None:
        return live.user_id
    for run in history:
        if run.state is not RunState.REFUSED and (run.lock_token or run.started_at):
            return run.user_id
    return tag_owner(tags)


def tag_owner(tags: Mapping[str, str] | None) -> str | None:
    """The `runctl:user` tag when it holds a Slack user id, else None: a tag is written by
    whoever may tag instances, so it never reaches a mention or a rule unchecked."""
    value = (tags or {}).get(OWNER_TAG) or ""
    return value if _USER_ID.fullmatch(value) else None


def needs_owner(settings: Settings, actions: Iterable[str]) -> bool:
    """Whether the current policy gives any of `actions` to the `owner` role."""
    policy = load(settings)
    return any(OWNER in policy.roles_for(action) for action in actions)


def owner_of(
    redis: Redis, command: commands.Command, tags: Callable[[str], Mapping[str, str]] | None = None
) -> str | None:
    """The owner of the instance the command touches (`owner`); `tags(instance_id)` is
    asked only when no run tells. Without it (the bot) None may mean "only the tag knows"."""
    instance_id = getattr(command, "instance_id", None)
    return instance_owner(redis, instance_id, tags) if instance_id else None


def instance_owner(
    redis: Redis, instance_id: str, tags: Callable[[str], Mapping[str, str]] | None = None
) -> str | None:
    """`owner` of an instance from its runs in Redis, then (when given) its tags."""
    live, history = RunStore(redis).on_instance(instance_id)
    found = owner(live, history, None)
    if found is None and tags is not None:
        found = owner(None, (), tags(instance_id))
    return found


def is_admin(settings: Settings, user_id: str) -> bool:
    """An admin by RUNCTL_ADMINS, the policy file's `admins`, or a user group listed there."""
    return _is_member(settings, user_id, admins(settings))


def check_answer(settings: Settings, user_id: str, requester_id: str | None) -> None:
    """A confirmation is answered by the person who asked for it or by an admin."""
    if requester_id is None or user_id == requester_id or is_admin(settings, user_id):
        return
    raise PermissionDenied(
        f"Only <@{requester_id}>, who asked, or an admin can answer this confirmation; nothing was done.",
        why=f"Admins: {_mentions(admins(settings)) or 'nobody yet (set RUNCTL_ADMINS)'}." + usergroups.trouble(),
        fix=f"Ask <@{requester_id}> or an admin to click it.",
    )


def recheck(
    settings: Settings, actor: Actor, *actions: str, owner_id: str | None = None, defer_owner: bool = False
) -> None:
    """The worker's check just before acting: channel, then every action."""
    if actor.channel_id:
        check_channel(settings, actor.channel_id)
    for action in actions:
        check(settings, actor.user_id, action, owner_id, defer_owner=defer_owner)


def _describe(roles: tuple[str, ...], owner_id: str | None) -> str:
    names = []
    for role in roles:
        if role == OWNER:
            names.append(
                f"the owner (<@{owner_id}>)"
                if owner_id
                else f"the owner (it has none: no run and no `{OWNER_TAG}` tag)"
            )
        else:
            names.append(f"role `{role}`")
    if not names:
        return "a role, and the policy gives this command to nobody"
    return " or ".join(names)


def _named_role(roles: tuple[str, ...]) -> str:
    return next((r for r in roles if r not in (EVERYONE, OWNER)), "")


def _mentions(ids: Iterable[str]) -> str:
    return ", ".join(f"<!subteam^{i}>" if i.startswith("S") else f"<@{i}>" for i in ids)
