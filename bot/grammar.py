"""The `/runctl` command grammar: text in, a command model or a UsageError out.

Each command is a ``Spec``; adding one is adding a spec to ``SPECS``.
"""

from __future__ import annotations

import difflib
import posixpath
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from workers import commands as c
from workers.errors import UsageError
from workers.slack.escape import code
from workers.slack.ids import ActionId

MAX_TEXT = 4000
MAX_ARGS = 100
MAX_ARG_LEN = 1000
_SHLEX_SPECIAL = re.compile(r"[\"'\\]")  # what shlex.split reads as quotes or an escape
_SHLEX_SPACE = re.compile(r"[ \t\r\n]+")  # shlex's whitespace
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})
_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")
_DASHES = re.compile(r"^[-\u2013\u2014]*[\u2013\u2014][-\u2013\u2014]*")  # with an en or em dash
_MARKUP = re.compile(r"<([^<>]*)>")
_PLAIN_NAME = re.compile(r"@[\w.'-][\w.' -]{0,79}")
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")

FlagKind = Literal["switch", "bool", "int", "str", "user", "instance"]


@dataclass(frozen=True)
class Flag:
    name: str  # without the leading dashes
    dest: str
    kind: FlagKind
    metavar: str = ""
    value: Any = True  # what a switch sets
    choices: tuple[str, ...] = ()
    help: str = field(kw_only=True)  # one line for `help <command>`


@dataclass(frozen=True)
class Spec:
    name: str
    usage: str
    summary: str
    positionals: tuple[str, ...] = ()  # dest names, in order
    optional_positionals: int = 0  # how many trailing positionals may be omitted
    flags: tuple[Flag, ...] = ()
    passthrough: bool = False  # accepts `-- args...`
    build: Callable[..., c.Command] = field(default=c.HelpCommand)
    details: str = ""

    def flag(self, name: str) -> Flag | None:
        return next((f for f in self.flags if f.name == name), None)


def _switch(name: str, dest: str, value: Any = True, *, help: str) -> Flag:
    return Flag(name, dest, "switch", value=value, help=help)


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec(
            "train",
            "/runctl train <instance-id> <script.py> [--ref REF] [--sync-code|--no-sync-code] "
            "[--wait|--no-wait] [--force] [--checkpoint-interval N] [--no-deps] [--rebuild-env] "
            "[--then stop|terminate|keep] [--backup] [--auto-resume] [--queue] [--nproc-per-node N|auto] "
            "-- <script args...>",
            "Ship the code at REF and start a training run on an instance, or on several (a,b,...) with torchrun.",
            positionals=("instance_id", "script"),
            flags=(
                Flag("ref", "ref", "str", "REF", help="the branch, tag or commit to ship (default RUNCTL_REF)"),
                Flag("sync-code", "sync_code", "bool", help="ship the code at REF to the instance first (the default)"),
                _switch("no-sync-code", "sync_code", False, help="run the code already on the instance"),
                Flag("wait", "wait", "bool", help="follow the run in the message thread (the default)"),
                _switch("no-wait", "wait", False, help="start the run and leave it"),
                _switch("force", "force", help="stop a live run on the instance gracefully first"),
                Flag(
                    "checkpoint-interval",
                    "checkpoint_interval",
                    "int",
                    "N",
                    help="checkpoint every N epochs (default 1; passed on to a script that accepts it)",
                ),
                _switch("no-deps", "deps", False, help="do not install the requirements file"),
                _switch("rebuild-env", "rebuild_env", help="build the run's environment again instead of reusing it"),
                Flag(
                    "then",
                    "then",
                    "str",
                    "stop|terminate|keep",
                    choices=("stop", "terminate", "keep"),
                    help="what happens to the instance when the run ends, however it ends (default RUNCTL_THEN); "
                    "needs your right to `stop` or `terminate` it, now and when the run ends",
                ),
                _switch("backup", "backup", help="copy each new checkpoint to S3 as it appears (by sha256, once)"),
                _switch(
                    "auto-resume",
                    "auto_resume",
                    help="on a spot interruption, continue on a replacement from the same preset",
                ),
                _switch(
                    "queue", "queue", help="if the instance is busy, wait in its queue (checked now, started next)"
                ),
                Flag(
                    "nproc-per-node",
                    "nproc_per_node",
                    "str",
                    "N|auto",
                    help="with several instances (a,b,...): torchrun's workers per node (auto: its GPUs, else 1)",
                ),
            ),
            passthrough=True,
            build=c.TrainCommand,
            details="Everything after `--` goes to the script verbatim. One training per "
            "instance: a live run blocks a new one unless `--force` (which stops it gracefully "
            "first). `--wait` (default) follows the run in the message thread. `--then stop` (or "
            "`terminate`) stops the instance when the run ends, however it ends; it needs the right to "
            "`stop` (or `terminate`) that instance, checked when you send it and again when the run ends "
            "(refused then: the instance keeps running and the thread says who may stop it). "
            "On a busy instance runctl offers [Queue after it]; `--queue` queues at once (see `help queue`).",
        ),
        Spec(
            "queue",
            "/runctl queue [instance-id] | /runctl queue cancel <queued-id>",
            "The runs queued behind live ones (every instance, or one); cancel one of yours.",
            positionals=("target", "queued_id"),
            optional_positionals=2,
            build=lambda **values: _queue_command(**values),
            details="A queued run was checked when queued (its ref pinned to a commit, the script compiled, your "
            "rights) and starts when the instance's live run ends, however it ends; you are mentioned in its "
            "message, and your rights are checked again then. At most `queue_limit` (policy file, default 3) "
            "queued runs per person. Its requester or an admin may cancel it ([Cancel], or `queue cancel <id>`).",
        ),
        Spec(
            "status",
            "/runctl status <instance-id>",
            "Instance state, uptime, the live run and its progress.",
            positionals=("instance_id",),
            build=c.StatusCommand,
        ),
        Spec(
            "stop",
            "/runctl stop <instance-id> [--grace SECONDS] [--force]",
            "Checkpoint the live run (SIGTERM), then stop the instance.",
            positionals=("instance_id",),
            flags=(
                Flag(
                    "grace",
                    "grace",
                    "int",
                    "SECONDS",
                    help="how long the run has to save a checkpoint after SIGTERM (default 120)",
                ),
                _switch("force", "force", help="stop at once, without waiting for a checkpoint (admins)"),
            ),
            build=c.StopCommand,
            details="The run gets SIGTERM and up to --grace seconds (default 120) to save a "
            "checkpoint; the report says what it saved. `--force` skips that (admins).",
        ),
        Spec(
            "start",
            "/runctl start <instance-id> [--no-wait]",
            "Start a stopped instance; offers to resume the last stopped run.",
            positionals=("instance_id",),
            flags=(
                Flag("wait", "wait", "bool", help="report in the thread when the instance is running (the default)"),
                _switch("no-wait", "wait", False, help="ask AWS to start it and answer at once"),
            ),
            build=c.StartCommand,
        ),
        Spec(
            "terminate",
            "/runctl terminate <instance-id>",
            "Ask to terminate an instance; nothing happens until the button is clicked.",
            positionals=("instance_id",),
            build=c.TerminateCommand,
            details="Posts a confirmation in the channel with the instance's checkpoints and "
            "cost. [Terminate] needs the requester or an admin, and expires after 10 minutes.",
        ),
        Spec(
            "resources",
            "/runctl resources [--all] [--sort cost|uptime|type] [--user @someone]",
            "Managed instances with uptime, $/h, cost so far and who is training.",
            flags=(
                _switch("all", "all", help="instances in every state, stopped ones too"),
                Flag(
                    "sort",
                    "sort",
                    "str",
                    "cost|uptime|type",
                    choices=("cost", "uptime", "type"),
                    help="the order of the rows (default cost)",
                ),
                Flag("user", "user", "user", "@someone", help="only the instances that person owns or trains on"),
            ),
            build=c.ResourcesCommand,
        ),
        Spec(
            "checkpoints",
            "/runctl checkpoints <instance-id> [--run RUN_ID]",
            "List a run's checkpoints on the instance, with an integrity check.",
            positionals=("instance_id",),
            flags=(Flag("run", "run_id", "str", "RUN_ID", help="that run instead of the newest one"),),
            build=c.CheckpointsCommand,
        ),
        Spec(
            "logs",
            "/runctl logs <instance-id> [--run RUN_ID] [--lines N] [--grep TEXT] [--node K]",
            "The tail of a run's training.log, in the run's thread.",
            positionals=("instance_id",),
            flags=(
                Flag("run", "run_id", "str", "RUN_ID", help="that run instead of the newest one on the instance"),
                Flag("node", "node", "int", "K", help="a multi-node run: node K's log (0: node 0, where rank 0 runs)"),
                Flag("lines", "lines", "int", "N", help="how many of the last lines (default 50, at most 500)"),
                Flag("grep", "grep", "str", "TEXT", help="only the lines holding TEXT (as typed, case-sensitive)"),
            ),
            build=c.LogsCommand,
            details="Posted in the run's thread when asked in its channel; elsewhere only its owner and admins "
            "may read it, privately. [Full log] on the run's messages attaches the whole file (gzipped above "
            "4 MB) in the run's thread: anyone in the run's channel, else its owner or an admin, may click it.",
        ),
        Spec(
            "chart",
            "/runctl chart <instance-id|run-id>",
            "A chart of a run's metrics so far (its loss and accuracy curves), in the run's thread.",
            positionals=("target",),
            build=c.ChartCommand,
            details="An instance id means its live run, else its newest. Read from the run's training.log "
            "(`name=value` pairs, `epoch N/M` lines, tqdm postfixes) and its progress file on the instance; "
            "who may ask is who may read the run's log. The same chart comes with a run's final reply.",
        ),
        Spec(
            "backup",
            "/runctl backup <instance-id> [--run RUN_ID]",
            "Copy checkpoints to S3 (each file once by sha256), so they outlive the instance.",
            positionals=("instance_id",),
            flags=(Flag("run", "run_id", "str", "RUN_ID", help="only that run (default: every run with checkpoints)"),),
            build=c.BackupCommand,
            details="The instance uploads through short-lived presigned URLs (it needs no AWS credentials) to "
            "s3://<bucket>/runctl/checkpoints/<run-id>/. Files above 5 GB are refused with the reason. Only runs "
            "runctl recorded, from the instance they ran on, for the run's owner or an admin.",
        ),
        Spec(
            "resume",
            "/runctl resume <run-id> [--on <instance-id>]",
            "Run a run's command again from its checkpoints, restored from S3 where the disk lacks them.",
            positionals=("run_id",),
            flags=(Flag("on", "instance_id", "instance", "i-…", help="another instance (default: the run's own)"),),
            build=c.ResumeCommand,
            details="Same script, commit and arguments. Checkpoints not on that instance's disk come from the "
            "run's S3 backup, each sha256-verified before the script starts: only files backed up from the run's "
            "own instance, and only into its checkpoint directory.",
        ),
        Spec(
            "audit",
            "/runctl audit [N] [--instance i-…] [--user @x]",
            "The newest N audit records (admins).",
            positionals=("count",),
            optional_positionals=1,
            flags=(
                Flag("instance", "instance_id", "instance", "i-…", help="only the records about that instance"),
                Flag("user", "user", "user", "@x", help="only that person's records"),
            ),
            build=c.AuditCommand,
        ),
        Spec(
            "launch",
            "/runctl launch <preset|instance-type> [--spot] [--region R] [--name NAME] [--disk GB]",
            "Launch an instance from an admin-defined template, after a confirmation with its price.",
            positionals=("target",),
            flags=(
                _switch("spot", "spot", help="a spot instance: cheaper, and AWS may take it back"),
                Flag("region", "region", "str", "R", help="the AWS region; only the worker's own region is accepted"),
                Flag(
                    "name", "instance_name", "str", "NAME", help="the instance's Name tag (default <target>-<you>-<id>)"
                ),
                Flag(
                    "disk",
                    "disk",
                    "int",
                    "GB",
                    help="the root volume in GB (default the preset's or template's; "
                    "past the launch file's `[limits] disk_gb` only admins, up to `admin_disk_gb`)",
                ),
            ),
            build=c.LaunchCommand,
            details="The AMI, subnet, security group and instance profile come from the launch file "
            "(RUNCTL_LAUNCH_FILE), never from chat. [Launch] needs the requester or an admin, and "
            "expires after 10 minutes. Caps per person and for the team are refused with the numbers.",
        ),
        Spec(
            "autostop",
            "/runctl autostop <instance-id> <minutes>|off",
            "Stop an instance after that many minutes with no live run (heads-up first).",
            positionals=("instance_id", "minutes"),
            build=c.AutostopCommand,
            details="Idle means no live run and, where nvidia-smi exists, the GPUs under "
            "RUNCTL_AUTOSTOP_GPU_PERCENT. Its owner gets a heads-up with [Keep running 1h] / [Stop now] "
            "first. A live run is never interrupted.",
        ),
        Spec(
            "help",
            "/runctl help [command]",
            "This help, or one command's.",
            positionals=("topic",),
            optional_positionals=1,
            build=c.HelpCommand,
        ),
    )
}


def _queue_command(target: str | None = None, queued_id: str | None = None) -> c.QueueCommand:
    usage = SPECS["queue"].usage
    if target is not None and target.lower() == "cancel":
        if queued_id is None:
            raise UsageError("Give the id of the queued run to cancel (`/runctl queue` lists them).", usage=usage)
        return c.QueueCommand(cancel=queued_id)
    if queued_id is not None:
        raise UsageError(f"Unexpected {code(queued_id)}.", usage=usage)
    return c.QueueCommand(instance_id=_instance(SPECS["queue"], target) if target else None)


def parse(text: str) -> c.AnyCommand:
    """Parse the text after `/runctl`. Raises UsageError, never anything else."""
    if len(text) > MAX_TEXT:
        raise UsageError(f"That command is {len(text)} characters; the limit is {MAX_TEXT}.")
    tokens = tokenize(text)
    if not tokens:
        return c.HelpCommand()
    name, rest = tokens[0].lower(), tokens[1:]
    spec = SPECS.get(name)
    if spec is None:
        _unknown_command([plain(t) for t in tokens])
    assert spec is not None
    values = _parse_tokens(spec, rest)
    if isinstance(values.get("instance_id"), tuple):  # train a,b,...: one run on several instances
        values["nodes"] = values["instance_id"]
        values["instance_id"] = values["nodes"][0]
    if spec.name == "help" and values.get("topic") not in (None, *SPECS):
        near = nearest(values["topic"], SPECS)
        raise UsageError(
            f"No help for {code(values['topic'])}." + (f" Did you mean `{near}`?" if near else ""),
            usage=spec.usage,
            suggestion=f"/runctl help {near}" if near else "",
        )
    try:
        command: c.AnyCommand = spec.build(**values)  # type: ignore[assignment]
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = str(err["loc"][0]) if err["loc"] else ""
        flag = next((f for f in spec.flags if f.dest == field_name), None)
        # What the person typed (`--checkpoint-interval`, `<instance-id>`), never the model's field name.
        where = f"`--{flag.name}`" if flag else (f"`<{field_name.replace('_', '-')}>`" if field_name else "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise UsageError(f"Bad value for {where}: {msg}." if where else f"{msg}.", usage=spec.usage) from None
    return command


def tokenize(text: str) -> list[str]:
    text = text.translate(_SMART_QUOTES)
    if _SHLEX_SPECIAL.search(text) is None:
        # No quote and no backslash: shlex.split (POSIX, no comments) splits on these four
        # whitespace characters only, and does nothing else; a plain split is 5-10x cheaper.
        tokens = [t for t in _SHLEX_SPACE.split(text) if t]
    else:
        try:
            tokens = shlex.split(text)
        except ValueError as exc:
            raise UsageError(f"Could not read that command: {exc} (check your quotes).") from None
    if len(tokens) > MAX_ARGS:
        raise UsageError(f"Too many arguments ({len(tokens)}); the limit is {MAX_ARGS}.")
    for tok in tokens:
        if len(tok) > MAX_ARG_LEN:
            raise UsageError(f"An argument is {len(tok)} characters long; the limit is {MAX_ARG_LEN}.")
        bad = next((ch for ch in tok if unicodedata.category(ch) == "Cc"), None)
        if bad is not None:
            raise UsageError(
                f"Argument {code(repr(plain(tok[:40])))} contains a control character ({bad!r}); "
                "newlines, tabs and NUL are not allowed inside an argument."
            )
    return tokens


def plain(token: str) -> str:
    """What the person typed, from what Slack sent: Slack HTML-escapes `&`, `<` and `>` in
    command text, and with `should_escape` turns mentions into markup (`<@U…|name>`,
    `<#C…|name>`, `<!channel>`, `<!subteam^S…|@team>`, `<https://…>`). A raw `<` is therefore
    always markup; it becomes the text it stands for, then the entities are undone."""

    def typed(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target[:1] in ("@", "#"):
            return target[0] + (label or target[1:])
        if target.startswith("!"):
            kind, _, ref = target[1:].partition("^")
            return label or "@" + (ref if kind == "subteam" else kind)
        return label or target

    text = _MARKUP.sub(typed, token)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _parse_tokens(spec: Spec, tokens: list[str]) -> dict[str, Any]:
    _check_dashes(spec, tokens)
    values: dict[str, Any] = {}
    positionals: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            if not spec.passthrough:
                raise UsageError(f"`{spec.name}` takes no script arguments.", usage=spec.usage)
            values["args"] = tuple(plain(t) for t in tokens[i + 1 :])
            break
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            name, eq, inline = tok.lstrip("-").partition("=")
            flag = spec.flag(name) if tok.startswith("--") else None
            if flag is None:
                _unknown_flag(spec, tokens, i, positionals)
            assert flag is not None
            if flag.kind == "switch":
                if eq:
                    raise UsageError(f"`--{name}` takes no value.", usage=spec.usage)
                values[flag.dest] = flag.value
                i += 1
                continue
            if flag.kind == "bool" and not eq:
                values[flag.dest] = True
                i += 1
                continue
            if eq:
                raw = inline
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                raw = tokens[i + 1]
                i += 1
            else:
                raise UsageError(f"`--{name}` needs a value ({flag.metavar}).", usage=spec.usage)
            values[flag.dest] = _convert(spec, flag, raw if flag.kind == "user" else plain(raw))
            i += 1
            continue
        if spec.passthrough and len(positionals) == len(spec.positionals):
            _missing_separator(spec, tokens, i)
        positionals.append(plain(tok))
        i += 1
    required = len(spec.positionals) - spec.optional_positionals
    if len(positionals) < required:
        missing = spec.positionals[len(positionals)]
        raise UsageError(f"Missing <{missing.replace('_', '-')}>.", usage=spec.usage)
    if len(positionals) > len(spec.positionals):
        raise UsageError(f"Unexpected {code(positionals[len(spec.positionals)])}.", usage=spec.usage)
    for dest, raw in zip(spec.positionals, positionals, strict=False):
        values[dest] = _positional(spec, dest, raw)
    return values


def _positional(spec: Spec, dest: str, raw: str) -> Any:
    if dest == "instance_id":
        if spec.name == "train" and "," in raw:
            return tuple(_instance(spec, part) for part in raw.split(","))
        return _instance(spec, raw)
    if dest == "script":
        return check_script_path(raw, spec.usage)
    if dest == "minutes":
        if raw.lower() == "off":
            return None
        if not raw.isdigit():
            raise UsageError(f"Give the idle minutes as a number, or `off`, not {code(raw)}.", usage=spec.usage)
        return int(raw)
    if dest == "count":
        if not raw.isdigit():
            raise UsageError(f"N must be a number, not {code(raw)}.", usage=spec.usage)
        return int(raw)
    return raw


def _convert(spec: Spec, flag: Flag, raw: str) -> Any:
    if flag.kind == "int":
        if not raw.isdigit():
            raise UsageError(f"`--{flag.name}` needs a whole number, not {code(raw)}.", usage=spec.usage)
        return int(raw)
    if flag.kind == "bool":
        lowered = raw.lower()
        if lowered not in ("true", "false"):
            raise UsageError(f"`--{flag.name}=` takes true or false, not {code(raw)}.", usage=spec.usage)
        return lowered == "true"
    if flag.kind == "user":
        match = _MENTION.match(raw)
        if match:
            return match.group(1)
        if re.fullmatch(r"@?[UW][A-Z0-9]{2,}", raw):
            return raw.lstrip("@")
        if _PLAIN_NAME.fullmatch(raw):
            return raw  # a name typed, not picked: the job resolves it (workers.slack.people)
        raise UsageError(
            f"`--{flag.name}` needs a Slack mention or a name like @someone, not {code(raw)}.", usage=spec.usage
        )
    if flag.kind == "instance":
        return _instance(spec, raw)
    if flag.choices and raw not in flag.choices:
        raise UsageError(
            f"`--{flag.name}` must be one of {', '.join(flag.choices)}, not {code(raw)}.",
            usage=spec.usage,
        )
    if flag.name == "ref":
        return check_ref(raw, spec.usage)
    return raw


def _instance(spec: Spec, raw: str) -> str:
    """An instance id, or its `Name` tag (the job resolves a name within the scope)."""
    try:
        return c.instance_ref(raw)
    except ValueError:
        pass
    raise UsageError(
        f"{code(raw)} is not an instance id (i- followed by 8 or 17 hex digits, e.g. "
        "i-0abc1234def567890) nor an instance name (its `Name` tag: letters, digits and `._-`).",
        usage=spec.usage,
    )


def check_script_path(raw: str, usage: str = "") -> str:
    """The same rule with or without `--no-sync-code` (the job checks it again)."""
    problem = c.script_problem(raw)
    if problem:
        raise UsageError(f"Script path {code(raw)} {problem}.", usage=usage)
    return posixpath.normpath(raw)


def check_ref(raw: str, usage: str = "") -> str:
    """git check-ref-format's rules, plus: a ref never starts with `-`."""
    bad = (
        raw.startswith("-")
        or raw in ("", "@")
        or len(raw) > 200
        or _REF_BAD.search(raw) is not None
        or raw.endswith((".", "/", ".lock"))
        or any(part.startswith(".") or part.endswith(".lock") for part in raw.split("/"))
    )
    if bad:
        raise UsageError(f"{code(raw)} is not a valid git ref.", usage=usage)
    return raw


def _is_number(tok: str) -> bool:
    return re.fullmatch(r"-\d+(\.\d+)?", tok) is not None


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of `choices`, by difflib's ratio and cutoff as for `--ref mian` (None if none is close)."""
    close = difflib.get_close_matches(word.lower(), list(choices), n=1)
    return close[0] if close else None


def _unknown_command(tokens: list[str]) -> None:
    near = nearest(tokens[0], SPECS)
    raise UsageError(
        f"Unknown command {code(plain(tokens[0]))}." + (f" Did you mean `{near}`?" if near else ""),
        usage="/runctl " + "|".join(SPECS),
        suggestion="/runctl " + shlex.join([near, *map(plain, tokens[1:])]) if near else "/runctl help",
    )


def _unknown_flag(spec: Spec, tokens: list[str], i: int, positionals: list[str]) -> None:
    tok = tokens[i]
    name, eq, inline = tok.lstrip("-").partition("=")
    near = nearest(name, (f.name for f in spec.flags))
    for_script = spec.passthrough and len(positionals) == len(spec.positionals)
    if for_script and near is None:
        _missing_separator(spec, tokens, i)
    if spec.name == "terminate" and tok == "--force":
        raise UsageError("`terminate` always asks for confirmation; there is no `--force`.", usage=spec.usage)
    what = f"Unknown option {code(plain(tok))} for `{spec.name}`."
    if near is None:
        raise UsageError(what, usage=spec.usage)
    what += f" Did you mean `--{near}`?"
    if for_script:  # a script's own option can look like a typo of ours: offer both
        what += f" If {code(plain(tok))} is for your script, put `--` before it: {code(_separated(spec, tokens, i))}."
    fixed = [spec.name, *map(plain, tokens[:i]), f"--{near}{eq}{plain(inline)}", *map(plain, tokens[i + 1 :])]
    raise UsageError(what, usage=spec.usage, suggestion="/runctl " + shlex.join(fixed))


def _missing_separator(spec: Spec, tokens: list[str], i: int) -> None:
    raise UsageError(
        f"{code(plain(tokens[i]))} looks like an argument for your script, but there is no `--` before it. "
        "runctl does not guess where its own options end.",
        usage=spec.usage,
        suggestion=_separated(spec, tokens, i),
    )


def _separated(spec: Spec, tokens: list[str], i: int) -> str:
    """The command with `--` before tokens[i]; a `--` typed later is then the script's no more (one `--`)."""
    rest = list(tokens[i:])
    if "--" in rest:
        rest.remove("--")
    return "/runctl " + shlex.join([spec.name, *map(plain, tokens[:i]), "--", *map(plain, rest)])


def _check_dashes(spec: Spec, tokens: list[str]) -> None:
    """`—epochs`, `— —epochs`, `–-epochs`: a `--` that Slack or macOS made an en or em dash.
    Refused with the command as meant (and as it then parses), never passed on."""
    fixed = [_DASHES.sub("--", tok, count=1) for tok in tokens]
    bad = next((tok for tok, fix in zip(tokens, fixed, strict=True) if tok != fix), None)
    if bad is None:
        return
    what = (
        f"{code(plain(bad))} starts with a long dash (— or –), which Slack and macOS put in for a typed `--`; "
        "runctl reads only `-` and `--`."
    )
    try:
        _parse_tokens(spec, fixed)
        suggestion = "/runctl " + shlex.join([spec.name, *map(plain, fixed)])
    except UsageError as exc:
        if not exc.suggestion:
            raise UsageError(f"{what} With `--` instead: {exc.what}", usage=spec.usage) from None
        suggestion = exc.suggestion
    raise UsageError(what, usage=spec.usage, suggestion=suggestion)


# Who may click each button: its policy action (CLICK_TIERS, bot/middleware.py) and against whom.
# "the owner": of the live run, else the last run that started, else the `runctl:user` tag.
BUTTON_HELP: dict[ActionId, str] = {
    ActionId.TERMINATE_CONFIRM: "[Terminate]: whoever asked, or an admin; with `terminate` (admins by default)",
    ActionId.TERMINATE_NO_BACKUP: "[Terminate without backup]: the same as [Terminate] (`terminate`)",
    ActionId.TERMINATE_STOP_INSTEAD: "[Stop instead]: whoever asked, or an admin; with `stop` on the instance "
    "(its owner or admins by default)",
    ActionId.TERMINATE_CANCEL: "[Cancel] on a terminate: whoever asked, or an admin (`terminate`)",
    ActionId.LAUNCH_CONFIRM: "[Launch]: whoever asked, or an admin; with `launch` (everyone by default, "
    "within the caps)",
    ActionId.LAUNCH_CANCEL: "[Cancel] on a launch: whoever asked, or an admin (`launch`)",
    ActionId.TRAIN_ON_IT: "[Train on it]: anyone with `train`; it only shows the command to send",
    ActionId.RESUME_TRAINING: "[Resume training]: the stopped run's owner or an admin (`resume`), with `train`",
    ActionId.FULL_LOG: "[Full log]: anyone with `logs` (everyone by default)",
    ActionId.AUTOSTOP_KEEP: "[Keep running 1h] on an autostop heads-up: the instance's owner or an admin (`autostop`)",
    ActionId.AUTOSTOP_STOP_NOW: "[Stop now] on an autostop heads-up: the instance's owner or an admin (`stop`)",
    ActionId.WARN_STOP_NOW: "[Stop now] on a cost or uptime warning: the instance's owner or an admin (`stop`)",
    ActionId.WARN_SNOOZE: "[Snooze 24h] on a warning: the instance's owner or an admin (`snooze`)",
    ActionId.WARN_KEEP: "[Keep running] on a warning: the instance's owner or an admin (`keep`)",
    ActionId.QUEUE_AFTER: "[Queue after it] on a busy answer: whoever asked, with `train` (checked again then)",
    ActionId.QUEUE_CANCEL: "[Cancel] on a queued run: whoever queued it, or an admin (`queue`)",
}


def help_text(topic: str | None = None) -> str:
    if topic:
        spec = SPECS[topic]
        lines = [f"`{spec.usage}`", spec.summary, *([spec.details] if spec.details else [])]
        if "instance_id" in spec.positionals:
            lines.append("• `<instance-id>`: the instance's id, or its name (the `Name` tag)")
        return "\n".join(lines + [f"• `{_flag_usage(f)}`: {f.help}" for f in spec.flags])
    lines = ["*runctl* — run and watch training jobs on EC2 from Slack."]
    lines += [f"• `{s.usage}`\n    {s.summary}" for s in SPECS.values()]
    lines.append(
        "*Who may click each button* (by default; a policy file's `[commands]` can give `stop`, "
        "`terminate`, `launch`, `autostop`, `train` and `logs` to other roles. The owner is the live run's "
        "user, else the last started run's, else the `runctl:user` tag):"
    )
    lines += [f"• {text}" for text in BUTTON_HELP.values()]
    return "\n".join(lines)


def _flag_usage(flag: Flag) -> str:
    if flag.kind in ("switch", "bool"):
        return f"--{flag.name}"
    return f"--{flag.name} {flag.metavar}"
