"""Spot interruptions: the wrapper of a run on a spot instance watches the instance
metadata for an interruption notice and SIGTERMs the training at once, so it checkpoints
within the two minutes AWS gives.

IMDSv2, as AWS documents it: a session token from `PUT /latest/api/token` (header
`X-aws-ec2-metadata-token-ttl-seconds`), then `GET /latest/meta-data/spot/instance-action`
with `X-aws-ec2-metadata-token`; 404 until a notice, then 200 with
`{"action": "stop"|"terminate"|"hibernate", "time": "<UTC>"}`; 401 for a stale token.
AWS recommends checking every 5 seconds. The endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT`
(the AWS SDKs' own setting) where the instance's environment sets it, else the real one.
"""

from __future__ import annotations

import json

IMDS = "http://169.254.169.254"
ENDPOINT_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
POLL_SECONDS = 5
TOKEN_TTL = 21600  # the most IMDS grants; the watcher renews well before
NOTICE_FILE = "spot_interruption"  # in the run directory: the notice, once the training was signalled


def watch(poll_seconds: float = POLL_SECONDS) -> str:
    """Wrapper lines, after `child` is set: a background watcher that, on a notice, writes
    `$RUN_DIR/spot_interruption` and SIGTERMs the wrapper's process group (the wrapper traps
    TERM and survives to record the exit code, as with `/runctl stop`). Needs curl."""
    return (
        f'imds="${{{ENDPOINT_VAR}:-{IMDS}}}"; imds="${{imds%/}}"\n'
        "if command -v curl >/dev/null 2>&1; then\n"
        "(\n"
        "  token=; token_at=0\n"
        '  while kill -0 "$child" 2>/dev/null; do\n'
        "    now=$(date +%s)\n"
        f'    if [ -z "$token" ] || [ $((now - token_at)) -ge {TOKEN_TTL // 2} ]; then\n'
        '      token=$(curl -sf -m 2 -X PUT "$imds/latest/api/token" '
        f'-H "X-aws-ec2-metadata-token-ttl-seconds: {TOKEN_TTL}" 2>/dev/null) || token=\n'
        "      token_at=$now\n"
        "    fi\n"
        '    if [ -n "$token" ]; then\n'
        '      code=$(curl -s -m 2 -o "$RUN_DIR/.spot" -w \'%{http_code}\' -H "X-aws-ec2-metadata-token: $token" '
        '"$imds/latest/meta-data/spot/instance-action" 2>/dev/null) || code=0\n'
        '      if [ "$code" = 200 ]; then\n'
        f'        mv "$RUN_DIR/.spot" "$RUN_DIR/{NOTICE_FILE}"\n'
        '        kill -TERM -"$$" 2>/dev/null || kill -TERM "$child" 2>/dev/null\n'
        "        exit 0\n"
        "      fi\n"
        '      [ "$code" = 401 ] && token=\n'
        "    fi\n"
        f"    sleep {poll_seconds:g}\n"
        "  done\n"
        ") </dev/null >/dev/null 2>&1 &\n"
        "spot_watch=$!\n"
        "else\n"
        "  echo 'runctl: no curl on this instance: spot interruption notices are not watched' >>\"$RUN_DIR/training.log\"\n"
        "fi\n"
    )


def unwatch() -> str:
    """Wrapper lines after the training ended: stop the watcher."""
    return 'if [ -n "${spot_watch:-}" ]; then kill "$spot_watch" 2>/dev/null || :; fi; rm -f "$RUN_DIR/.spot"\n'


def report(section: str) -> str:
    """Status lines inside `runs_status`'s per-run loop (after frame.ENC): when the watcher
    acted on a notice (epoch seconds, the training was signalled then) and the notice, encoded."""
    return (
        f'if [ -f "$RUN_DIR/{NOTICE_FILE}" ]; then\n'
        f'  echo "{section}spot $(date -r "$RUN_DIR/{NOTICE_FILE}" +%s | tr -cd \'0-9\') '
        f'$(head -c 300 "$RUN_DIR/{NOTICE_FILE}" | enc)"\n'
        "fi\n"
    )


def describe(notice: str) -> str:
    """`stop at 2026-12-02T01:10:00Z` from the notice's JSON (what IMDS answered, kept as text)."""
    try:
        data = json.loads(notice)
    except (ValueError, RecursionError):
        return "notice received"
    if not isinstance(data, dict):
        return "notice received"
    action, when = str(data.get("action", "")), str(data.get("time", ""))
    return f"{action} at {when}" if action and when else "notice received"
