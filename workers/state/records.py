"""Run records the bot signs: a run's `meta.json` lives on its instance, where every trainer
is root, so the reconcile believes it only with the bot's signature on it.

The key: RUNCTL_RECORD_KEY when set, else derived from SLACK_BOT_TOKEN; a worker holds it,
an instance never does (nor Redis, so it survives the loss of Redis). What is signed: every
field of the meta as written (run id, the instance it was started on, user, channel, ts,
script, ref, sha, checkpoint_run_id, then, ...), as canonical JSON. A meta is adopted only
with a good signature, for its own run directory, from the instance it was started on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

from pydantic import ValidationError

from workers.errors import ConfigError
from workers.settings import Settings
from workers.state.runs import RUN_ID, RunMeta

_LABEL = b"runctl run records v1"  # the derived key signs these and nothing else
_PREFIX = "v1="


class Forged(ValueError):
    """A meta.json the bot did not sign for that run on that instance; the message says why."""


def record_key(settings: Settings) -> bytes:
    for name in ("RUNCTL_RECORD_KEY", "SLACK_BOT_TOKEN"):
        if getattr(settings, name) is not None:
            return hmac.new(settings.secret(name).encode(), _LABEL, hashlib.sha256).digest()
    raise ConfigError("runctl: set RUNCTL_RECORD_KEY or SLACK_BOT_TOKEN: run records are signed with it")


def _canonical(fields: Mapping[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: bytes, fields: Mapping[str, object]) -> str:
    return _PREFIX + hmac.new(key, b"meta:" + _canonical(fields), hashlib.sha256).hexdigest()


def signed_meta(key: bytes, meta: RunMeta) -> str:
    """meta.json's text (one ASCII line): the meta and its signature."""
    fields = meta.model_dump(mode="json", exclude={"sig"})
    return json.dumps({**fields, "sig": _mac(key, fields)}, ensure_ascii=True)


def verified_meta(key: bytes, text: str, run_id: str, instance_id: str) -> RunMeta:
    """The meta in `text`, reported by `instance_id` for run directory `run_id`; Forged unless
    the bot signed exactly it, for that run, started on that instance (or one of its nodes)."""
    if not RUN_ID.fullmatch(run_id):
        raise Forged("not a runctl run id")
    try:
        fields = json.loads(text)
    except ValueError:
        raise Forged("meta.json is not JSON") from None
    if not isinstance(fields, dict):
        raise Forged("meta.json is not a JSON object")
    sig = fields.pop("sig", None)
    if not isinstance(sig, str) or not hmac.compare_digest(sig.encode(), _mac(key, fields).encode()):
        raise Forged("meta.json is not signed by runctl")  # unsigned, altered, or signed with another key
    if fields.get("run_id") != run_id:
        raise Forged("meta.json is another run's")
    nodes = fields.get("nodes") or []  # signed: a multi-node run's other nodes carry node 0's meta
    if fields.get("instance_id") != instance_id and not (isinstance(nodes, list) and instance_id in nodes):
        raise Forged("meta.json is of a run started on another instance")
    try:
        return RunMeta.model_validate({**fields, "sig": sig})
    except ValidationError:
        raise Forged("meta.json does not describe a run") from None
