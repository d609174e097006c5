"""`/runctl launch`: a confirmation with the price, then [Launch] runs the instance from the
admins' template, waits for `running` and the SSM agent, and offers [Train on it]."""

from __future__ import annotations

import logging
import secrets
from decimal import Decimal

from slack_sdk.errors import SlackApiError

from workers import audit, policy
from workers.aws import fleet, launcher, names
from workers.aws.launcher import Launcher, LaunchFile, Spec
from workers.commands import Actor, LaunchCommand
from workers.cost import disk, fleetview
from workers.cost.pricing import format_rate, format_usd
from workers.errors import ConfigError, PermissionDenied, RunctlError
from workers.jobs import caps, funnel
from workers.jobs.caps import Ask, Quote, held, quote
from workers.jobs.confirm import ConfirmClick
from workers.jobs.funnel import Job
from workers.services import Services
from workers.slack.format import duration
from workers.slack.ids import ActionId
from workers.slack.messages.launch import confirm_blocks, ready_blocks, train_command
from workers.state.autostop import AutostopStore, Setting
from workers.state.confirmations import Confirmation, ConfirmStore, new_nonce
from workers.state.uptime import UptimeLedger

log = logging.getLogger(__name__)


@funnel.command(LaunchCommand)
def launch(job: Job, cmd: LaunchCommand) -> str:
    return ask_to_launch(job.svc, cmd, job.actor)


# --- what to launch ------------------------------------------------------------------


def resolve(svc: Services, config: LaunchFile, cmd: LaunchCommand, actor: Actor) -> Spec:
    """The preset or type, checked against the launch file: never an AMI or network from chat."""
    region = svc.fleet.region
    if cmd.region not in (None, region):
        raise PermissionDenied(
            f"This runctl launches only in {region}, not {cmd.region}.",
            why="The launch template (AMI, subnets, security groups) belongs to the worker's region "
            "(AWS_DEFAULT_REGION); runctl manages instances in RUNCTL_REGIONS but launches only there.",
            fix=f"`/runctl launch {cmd.target}` (in {region}), or ask an admin for a worker in {cmd.region}.",
        )
    if region not in svc.fleet.regions:
        raise ConfigError(
            f"runctl launches in {region}, but RUNCTL_REGIONS ({svc.fleet.regions_text}) leaves it out.",
            why="An instance launched there could not be trained on, stopped or priced.",
            fix=f"An admin adds {region} to RUNCTL_REGIONS.",
        )
    preset = config.presets.get(cmd.target)
    is_admin = policy.is_admin(svc.settings, actor.user_id)
    if preset is not None:
        if preset.users and not is_admin and not policy._is_member(svc.settings, actor.user_id, preset.users):
            raise PermissionDenied(
                f"Preset `{cmd.target}` is not open to you.",
                why=f"The launch file gives it to {', '.join(f'<@{u}>' for u in preset.users)}.",
                fix=f"Pick another preset ({_presets(config)}), or ask an admin.",
            )
        itype, disk, spot = preset.instance_type, preset.disk_gb, preset.spot
    else:
        itype, disk, spot = cmd.target, None, False
        priced = caps.on_demand(svc, region, itype).known
        if itype not in config.limits.instance_types and not (is_admin and priced):
            raise PermissionDenied(
                f"`{cmd.target}` is neither a preset nor an instance type you may launch.",
                why=f"Presets: {_presets(config)}. Types: "
                f"{', '.join(f'`{t}`' for t in config.limits.instance_types) or 'none besides presets'}.",
                fix=f"`/runctl launch {next(iter(config.presets), '<preset>')}`",
            )
    short = secrets.token_hex(2)
    return Spec(
        preset=cmd.target,
        instance_type=itype,
        spot=cmd.spot or spot,
        disk_gb=cmd.disk or disk or config.template.disk_gb,
        name=cmd.instance_name or f"{cmd.target}-{(actor.user_name or actor.user_id).lower()}-{short}",
        region=region,
    )


def _presets(config: LaunchFile) -> str:
    return ", ".join(f"`{n}` ({p.instance_type})" for n, p in config.presets.items()) or "none"


def launch_ask(svc: Services, config: LaunchFile, spec: Spec, price: Quote, user_id: str, target: str) -> Ask:
    """A launch for `user_id`, as the caps see it (the disk too: its size is money)."""
    default = caps.default_disk(config, spec)
    fix = caps.stop_one_first(user_id)
    if spec.disk_gb != default:  # the disk's fix first: it may be the only problem
        fix = (
            f"`/runctl launch {target}` (its {default} GB) or `--disk {config.limits.disk_gb}` or less; "
            f"an admin may launch up to {config.limits.admin_disk_gb} GB. Past an instance cap: {fix}"
        )
    return Ask(
        what="Launch",
        user_id=user_id,
        price=price,
        fix=fix,
        disk_gb=spec.disk_gb,
        disk_default=default,
        admin=policy.is_admin(svc.settings, user_id),
        region=spec.region,
    )


def ask_to_launch(svc: Services, cmd: LaunchCommand, actor: Actor) -> str:
    config = launcher.load(svc.settings.RUNCTL_LAUNCH_FILE)
    spec = resolve(svc, config, cmd, actor)
    names.refuse_taken(
        spec.name, svc.fleet.iter_instances(), "/runctl launch " + cmd.target + (" --spot" if cmd.spot else "")
    )
    notes = Launcher(svc.fleet).check_template(config.template, svc.settings.RUNCTL_LAUNCH_FILE)  # before the click
    price = quote(svc, config, spec)
    now = svc.clock()
    rows = fleetview.view(svc, now)
    mine = held(rows, actor.user_id)
    caps.check(config, mine, launch_ask(svc, config, spec, price, actor.user_id, cmd.target))
    spend = [r for r in rows if r.owner == actor.user_id]
    burn = sum((r.price.usd_per_hour or Decimal(0) for r in spend if r.running), Decimal(0))
    so_far = sum((r.cost or Decimal(0) for r in spend), Decimal(0))
    daily = None if price.usd_per_hour is None else price.usd_per_hour * 24
    head = (
        f":rocket: <@{actor.user_id}> asks to *launch {spec.name}* · {spec.instance_type}"
        f"{' (spot)' if spec.spot else ''} · preset `{spec.preset}` · {spec.disk_gb} GB disk"
    )
    lines = [
        f"*{price.text()}* · about {format_usd(daily)} a day if it runs around the clock.",
        f"{disk.describe(spec.region, spec.disk_gb)}.",
        f"<@{actor.user_id}> now: {len([r for r in spend if r.running])} running instance(s) at "
        f"${format_rate(burn)}/h, {format_usd(so_far)} spent on them so far.",
        f"Launched instances: yours {mine.user_instances}/{config.limits.user_instances}, "
        f"team {mine.team_instances}/{config.limits.team_instances}.",
    ]
    if svc.settings.RUNCTL_AUTOSTOP_MINUTES:
        lines.append(
            f"Autostop: stopped after {svc.settings.RUNCTL_AUTOSTOP_MINUTES} min with no live run "
            "(`/runctl autostop <instance> off` to keep it)."
        )
    lines += notes
    command = "/runctl launch " + cmd.target + (" --spot" if cmd.spot else "")
    conf = Confirmation(
        nonce=new_nonce(),
        requester_id=actor.user_id,
        channel_id=actor.channel_id,
        created_at=now,
        kind="launch",
        command=command,
        payload=spec.as_dict(),
    )
    text, blocks = confirm_blocks(head, lines, conf.nonce, actor.user_id, conf.expires_at)
    conf.message_ts = svc.notifier.post(actor.channel_id, text, blocks)
    ConfirmStore(svc.redis).save(conf)
    return f"launch of {spec.instance_type} ({price.text()}) awaits confirmation"


# --- the click -------------------------------------------------------------------


@funnel.click("click confirmation", 2)
def confirm_click(job: Job, action: str, nonce: str, message_ts: str) -> str:
    """[Launch]/[Cancel] on a launch's confirmation (`confirm_click(action, nonce, actor, message_ts)`)."""
    return LaunchClick(job, ActionId(action), nonce, message_ts).handle()


class LaunchClick(ConfirmClick):
    ACTIONS = (ActionId.LAUNCH_CONFIRM, ActionId.LAUNCH_CANCEL)

    def handle(self) -> str:
        mention = f"<@{self.actor.user_id}>"
        label = "Launch" if self.action is ActionId.LAUNCH_CONFIRM else "Cancel"
        conf = self.claim(label, ActionId.LAUNCH_CONFIRM, "launch")
        if conf is None:
            return self.too_late()
        spec = Spec.from_dict(conf.payload)
        if self.action is ActionId.LAUNCH_CANCEL:
            return self.show(conf, f":x: Launch of *{spec.name}* ({spec.instance_type}) cancelled by {mention}.")
        self.show(
            conf, f":hourglass_flowing_sand: {mention} confirmed: launching *{spec.name}* ({spec.instance_type})…"
        )
        try:
            return self.launch(conf, spec)
        except LaunchedBut as exc:
            self.show(conf, f":warning: {exc.what}")
            raise
        except RunctlError as exc:
            self.show(conf, f":warning: Launch of *{spec.name}* did not happen: {exc.what}")
            raise

    def record(self, conf: Confirmation, outcome: str, instance: str) -> None:
        """A step of the launch in the audit trail, as the requester's (the funnel records the click's end)."""
        requester = Actor(
            user_id=conf.requester_id, channel_id=conf.channel_id, text=conf.command.removeprefix("/runctl ")
        )
        entry = audit.of(
            requester, "allowed", f"launch {outcome} (clicked by <@{self.actor.user_id}>)", instance=instance
        )
        audit.record(self.svc.redis, self.svc.settings.RUNCTL_AUDIT_MAXLEN, entry)

    def launch(self, conf: Confirmation, spec: Spec) -> str:
        svc = self.svc
        requester = Actor(user_id=conf.requester_id, channel_id=conf.channel_id)
        policy.recheck(svc.settings, requester, "launch")  # the policy may have changed in 10 minutes
        config = launcher.load(svc.settings.RUNCTL_LAUNCH_FILE)
        began = svc.clock()
        run = Launcher(svc.fleet)
        ask = launch_ask(svc, config, spec, quote(svc, config, spec), requester.user_id, spec.preset)
        with caps.admit(svc, config, ask):
            names.refuse_taken(spec.name, svc.fleet.iter_instances(), conf.command)  # taken since the ask?
            iid = run.run(config.template, spec, requester.user_id, conf.nonce, policy.scope(svc.settings))
        self.job.instance_id = iid
        self.record(conf, "launched", iid)
        settings = svc.settings
        minutes = settings.RUNCTL_AUTOSTOP_MINUTES
        if minutes:  # at once: an instance whose agent never comes still stops
            AutostopStore(svc.redis).save(
                Setting(
                    instance_id=iid,
                    minutes=minutes,
                    set_by="launch",
                    channel=conf.channel_id,
                    thread_ts=conf.message_ts,
                    owner=requester.user_id,
                )
            )
        self.show(conf, f":hourglass_flowing_sand: *{spec.name}* is `{iid}`: waiting for `running` and its SSM agent…")
        try:
            run.wait_running(iid, settings.RUNCTL_LAUNCH_POLL_SECONDS, settings.RUNCTL_PENDING_WAIT_SECONDS)
            inst = svc.fleet.get(iid)
            UptimeLedger(svc.redis).mark_running(iid, inst.launch_time or svc.clock())
            svc.fleet.wait_for_agent(inst, fleet.AGENT_WAIT_SECONDS)
        except RunctlError as exc:
            self.record(conf, "not ready", iid)
            raise launched_but(exc, spec, iid, minutes) from exc
        took = duration((svc.clock() - began).total_seconds())
        lines = [
            f":white_check_mark: <@{requester.user_id}> *{inst.label}* is ready: {inst.type}"
            f"{' spot' if spec.spot else ''} in {inst.availability_zone}, `running`, SSM agent Online, "
            f"in {took}."
        ]
        if minutes:
            lines.append(
                f"Autostop: it stops after {minutes} min with no live run, with a heads-up here first "
                f"(`/runctl autostop {iid} off` keeps it)."
            )
        lines.append(f"Train on it: `{train_command(iid)}`")
        text, blocks = ready_blocks("\n".join(lines), iid)
        try:
            svc.notifier.update(conf.channel_id, conf.message_ts or self.message_ts, text, blocks)
            svc.notifier.post(conf.channel_id, f"<@{requester.user_id}> `{iid}` is ready.", thread_ts=conf.message_ts)
        except SlackApiError as exc:
            log.warning("could not post the launch report: %s", exc.response.get("error"))
        self.record(conf, "ready", iid)
        return text


class LaunchedBut(RunctlError):
    """A failure after RunInstances succeeded: the instance exists, runs and bills."""


def launched_but(exc: RunctlError, spec: Spec, iid: str, autostop_minutes: int) -> LaunchedBut:
    stops = (
        f"autostop stops it after {autostop_minutes} min with no live run"
        if autostop_minutes
        else "no autostop is set, so it runs until someone stops it"
    )
    return LaunchedBut(
        f"*{spec.name}* launched but is not ready: `{iid}` is running and billing, and {stops}. {exc.what}",
        why=" ".join(
            part
            for part in (
                exc.why,
                "A fresh instance's SSM agent takes minutes to register, and never does without an instance "
                "profile with AmazonSSMManagedInstanceCore or a route to SSM (a private subnet needs a NAT "
                "gateway or VPC endpoints).",
            )
            if part
        ),
        fix=f"Give it the agent (an instance profile with AmazonSSMManagedInstanceCore; egress to SSM or VPC "
        f"endpoints for ssm, ssmmessages and ec2messages), then `/runctl status {iid}`; "
        f"or `/runctl terminate {iid}`.",
    )
