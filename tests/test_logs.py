"""`/runctl logs` and [Full log] against moto + the executing-SSM shim (every script runs
under /bin/sh on the sandbox instance), moto S3 behind the presigned-URL gate, and the fake
Slack that refuses what Slack refuses (block limits, file uploads)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import boto3
import pytest

from bot.grammar import parse
from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import MAX_SECTION_TEXT, FakeSlack, Message
from runctl_sandbox.inline import InlineWorker
from workers.commands import Actor, LogsCommand
from workers.errors import UsageError
from workers.jobs.logs import UPLOAD_SECONDS, full_log, logs
from workers.remote.logs import parse_tail, parse_upload, tail_script, upload_script
from workers.services import Services
from workers.slack.ids import ActionId

from .conftest import BUCKET
from .slack import click
from .test_lifecycle import as_dict, dispatch
from .test_ownership import slash
from .test_train_flow import ALICE, start

QUICK = ("--epochs", "1", "--steps-per-epoch", "1", "--step-seconds", "0")
ELSEWHERE = Actor(user_id="U0ALICE", channel_id="C0OPS")


def finished_run(svc: Services, worker: InlineWorker, iid: str) -> str:
    run_id = start(iid, "train_with_checkpoints.py", *QUICK)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None and run.state.ended and run.message_ts, run
    return run_id


def log_file(sandbox: Sandbox, iid: str, run_id: str) -> Path:
    """The run's training.log on the sandbox instance, wherever the run's directory is."""
    found = [p for p in sandbox.instance_dir(iid).rglob("training.log") if run_id in p.parts]
    assert len(found) == 1, found
    return found[0]


def ask(cmd_text: str, who: Actor = ALICE) -> None:
    cmd = parse(cmd_text)
    assert isinstance(cmd, LogsCommand)
    logs(cmd.model_dump(mode="json"), who.model_dump(mode="json"))


def sections(message: Message) -> list[str]:
    return [b["text"]["text"] for b in message.blocks if b.get("type") == "section"]


def code_lines(messages: list[Message]) -> list[str]:
    """The log lines shown, in order, from the code blocks of the answer's messages."""
    out: list[str] = []
    for m in messages:
        for text in sections(m):
            if text.startswith("```"):
                out.extend(text[3:-3].split("\n"))
    return out


def since(slack: FakeSlack, channel: str, ts: str, before: int) -> list[Message]:
    return slack.thread(channel, ts)[before:]


def test_logs_tails_the_newest_run_with_lines_and_grep(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    older = finished_run(svc, worker, iid)
    newest = finished_run(svc, worker, iid)
    log_file(sandbox, iid, older).write_text("the older run\n")
    log_file(sandbox, iid, newest).write_text(
        "".join(f"line {i:04d} {'epoch' if i % 10 == 0 else 'step'} loss={i / 1000:.3f}\n" for i in range(1, 121))
    )
    run = svc.runs.get(newest)
    assert run is not None and run.message_ts
    before = len(slack.thread("C0TRAIN", run.message_ts))

    ask(f"logs {iid}")  # asked in the run's channel: answered in the newest run's thread
    answer = since(slack, "C0TRAIN", run.message_ts, before)
    assert len(answer) == 1 and not answer[0].ephemeral
    shown = code_lines(answer)
    assert len(shown) == 50 and shown[0].startswith("line 0071") and shown[-1].startswith("line 0120")
    head = sections(answer[0])[0]
    assert newest in head and "last 50 of 120 lines" in head
    assert any(
        b.get("type") == "actions" and b["elements"][0]["action_id"] == ActionId.FULL_LOG for b in answer[0].blocks
    )

    before = len(slack.thread("C0TRAIN", run.message_ts))
    ask(f"logs {iid} --lines 5 --grep epoch")
    shown = code_lines(since(slack, "C0TRAIN", run.message_ts, before))
    assert shown == [f"line {i:04d} epoch loss={i / 1000:.3f}" for i in (80, 90, 100, 110, 120)]
    assert "last 5 of 12 lines holding `epoch`" in sections(slack.thread("C0TRAIN", run.message_ts)[-1])[0]

    # Another run by id; asked outside the run's channel: only the asker sees it.
    seen = len(slack.ephemerals("U0ALICE"))
    ask(f"logs {iid} --run {older} --lines 3", ELSEWHERE)
    private = slack.ephemerals("U0ALICE")[seen:]
    assert len(private) == 1 and private[0].channel == "C0OPS"
    assert code_lines(private) == ["the older run"]

    other = fleet_seed.instances["gpu-box-1"]
    ask(f"logs {other} --run {newest}")
    assert f"Run `{newest}` ran on `{iid}`, not `{other}`" in slack.ephemerals("U0ALICE")[-1].text

    with pytest.raises(UsageError):
        parse(f"logs {iid} --lines 501")


def test_hostile_log_lines_stay_within_slacks_limits(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = finished_run(svc, worker, iid)
    long_line = b"x" * 5991 + b" tail-end"  # 6,000 characters
    log_file(sandbox, iid, run_id).write_bytes(
        b"\x1b[31mred\x1b[0m \x1b]0;title\x07done\n"
        + b"nul\x00byte and bad utf-8 \xff\xfe\xc3(\n"
        + b"<!channel> ```closing``` & <@U0BOB> <https://evil|click>\n"
        + b"progress 10%\rprogress 50%\rprogress 100%\r\n"
        + long_line
        + b"\n"
        + "caf\u00e9 \u2713\n".encode()
        + b"&" * 3000
        + b"\n"
    )
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts
    before = len(slack.thread("C0TRAIN", run.message_ts))
    ask(f"logs {iid}")
    answer = since(slack, "C0TRAIN", run.message_ts, before)
    assert answer and not any(c.error for c in slack.calls_to("chat.postMessage"))
    texts = [t for m in answer for t in sections(m)]
    assert all(len(t) <= MAX_SECTION_TEXT for t in texts)
    blocks = [t for t in texts if t.startswith("```")]
    assert all(t.count("```") == 2 and t.endswith("```") for t in blocks)  # nothing closes a code block early
    shown = code_lines(answer)
    assert shown[0] == "red done"  # ANSI colours and the title sequence are gone
    assert shown[1] == "nul\ufffdbyte and bad utf-8 \ufffd\ufffd\ufffd("
    assert shown[2].startswith("&lt;!channel&gt; \u02cb\u02cb\u02cbclosing") and "&lt;@U0BOB&gt;" in shown[2]
    assert shown[3] == "progress 100%"  # a redrawn progress bar: what the terminal showed last
    assert shown[4].startswith("x" * 900) and shown[4].endswith("…[+5,000 characters]")
    assert shown[5] == "caf\u00e9 \u2713"
    assert shown[6].startswith("&amp;") and "…[+" in shown[6]
    everything = json.dumps([m.blocks for m in answer]) + "".join(m.text for m in answer)
    assert "\\u0000" not in everything and "\\u001b" not in everything and "<!channel>" not in everything


def test_full_log_attaches_the_complete_50_mb_log_and_leaves_nothing_in_s3(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = finished_run(svc, worker, iid)
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts
    # [Full log] is on the parent message and on the final reply.
    parent = next(m for m in slack.messages("C0TRAIN") if m.ts == run.message_ts)
    final = next(m for m in slack.thread("C0TRAIN", run.message_ts) if "finished (exit 0)" in m.text)
    for message in (parent, final):
        buttons = [e for b in message.blocks if b.get("type") == "actions" for e in b["elements"]]
        assert [(b["action_id"], b["value"]) for b in buttons] == [(ActionId.FULL_LOG, run_id)]
    data = b"".join(
        f"{i:09d} epoch {i // 10000} step {i} loss={(i * 7919) % 10007 / 10007:.6f}\n".encode()
        for i in range(1_200_000)
    )[: 50 * 1024 * 1024]
    assert len(data) == 50 * 1024 * 1024
    log_file(sandbox, iid, run_id).write_bytes(data)

    full_log(run_id, ALICE.model_dump(mode="json"))

    (attached,) = slack.files
    assert attached.channel == "C0TRAIN" and attached.thread_ts == run.message_ts
    assert attached.filename == f"{run_id}-training.log.gz"
    assert gzip.decompress(attached.content) == data
    assert attached.initial_comment and "<@U0ALICE>" in attached.initial_comment
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=sandbox.endpoint_url)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="runctl/logs/").get("KeyCount") == 0


def test_a_small_log_is_attached_as_is(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    run_id = finished_run(svc, worker, iid)
    data = log_file(sandbox, iid, run_id).read_bytes()
    full_log(run_id, ALICE.model_dump(mode="json"))
    (attached,) = slack.files
    assert attached.filename == f"{run_id}-training.log" and attached.content == data and b"epoch 1/1" in data


def test_presigned_urls_never_reach_slack_or_the_logs(
    svc: Services,
    fleet_seed: SeedInfo,
    sandbox: Sandbox,
    slack: FakeSlack,
    worker: InlineWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="workers")
    iid = fleet_seed.instances["cpu-box"]
    run_id = finished_run(svc, worker, iid)
    seen = len(sandbox.s3.seen)
    full_log(run_id, ALICE.model_dump(mode="json"))  # works
    sandbox.s3.expire_next()
    full_log(run_id, ALICE.model_dump(mode="json"))  # S3 refuses the PUT: told, with S3's code only
    queries = [parse_qs(q) for q in sandbox.s3.seen[seen:]]
    assert len(queries) == 2
    for query in queries:
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        # valid while SSM may hold the command and then run it, and minutes more at most
        assert 2 * UPLOAD_SECONDS <= int(query["X-Amz-Expires"][0]) <= 2 * UPLOAD_SECONDS + 300
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts
    refusal = slack.thread("C0TRAIN", run.message_ts)[-1].text
    assert "could not upload the training.log" in refusal and "HTTP 403 (AccessDenied)" in refusal
    said = json.dumps([c.params for c in slack.calls]) + caplog.text
    for query in queries:
        for secret in (query["X-Amz-Signature"][0], query["X-Amz-Credential"][0]):
            assert secret not in said
    assert "X-Amz-Signature" not in said and "X-Amz-Credential" not in said


def test_logs_and_full_log_through_the_signed_front_door(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    """The slash command and the button as Slack sends them, through the Bolt app and the queue."""
    iid = fleet_seed.instances["cpu-box"]
    run_id = finished_run(svc, worker, iid)
    run = svc.runs.get(run_id)
    assert run is not None and run.message_ts
    before = len(slack.thread("C0TRAIN", run.message_ts))
    # by its Name tag, as every instance command takes it; the answer is the message
    assert slash(svc, slack, worker, "logs cpu-box --lines 2", "U0BOB") == ""
    answer = since(slack, "C0TRAIN", run.message_ts, before)
    assert len(answer) == 1 and answer[0].text.startswith("<@U0BOB>") and len(code_lines(answer)) == 2
    dispatch(svc, slack, worker, click(as_dict(answer[0]), ActionId.FULL_LOG, "U0BOB"))
    (attached,) = slack.files
    assert attached.thread_ts == run.message_ts
    assert attached.content == log_file(sandbox, iid, run_id).read_bytes()


def tools(tmp_path: Path, *names: str) -> str:
    """A PATH holding only these tools (links to this machine's), as on a bare image."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        found = sys.executable if name == "python3" else shutil.which(name)
        assert found, name
        (bindir / name).symlink_to(found)
    return str(bindir)


BASICS = ("sh", "ls", "head", "tail", "wc", "tr", "sed", "grep", "gzip", "basename", "dirname", "mktemp", "rm", "od")


@pytest.mark.parametrize("uploader", ["wget", "python3"])
def test_without_curl_or_base64_the_log_still_arrives_whole(
    svc: Services, fleet_seed: SeedInfo, tmp_path: Path, uploader: str
) -> None:
    """The upload falls back to wget, then python3; the tail to od's hex. Scripts run under sh
    with nothing else on PATH, against moto S3 behind the presigned-URL gate."""
    root = tmp_path / "root"
    run_id = "r20261201-120000-abcdef"
    log = root / "runs" / run_id / "training.log"
    log.parent.mkdir(parents=True)
    data = bytes(range(256)) * 40 + b"\nlast line with 'quotes' $(touch nope) ; and \\ slashes\n"
    log.write_bytes(data)
    path = tools(tmp_path, *BASICS, uploader)
    env = {"PATH": path}

    out = subprocess.run(
        ["sh", "-c", tail_script(str(root), None, 3, "$(touch nope)")],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    tail = parse_tail(out.stdout.decode())
    assert tail.run_id == run_id and tail.matches == 1
    assert tail.data == b"last line with 'quotes' $(touch nope) ; and \\ slashes\n"
    assert not (tmp_path / "nope").exists() and not Path("nope").exists()

    key = f"runctl/logs/{run_id}/fallback-{uploader}"
    url = svc.fleet.presign(key, 300, method="put_object")
    out = subprocess.run(
        ["sh", "-c", upload_script(str(root), run_id, url)], env=env, capture_output=True, timeout=120, check=True
    )
    upload = parse_upload(out.stdout.decode())
    assert upload.ok, (upload, out.stderr)
    assert svc.fleet.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    svc.fleet.delete(key)
    assert url not in out.stdout.decode() + out.stderr.decode()
