"""The fake Slack Web API, driven through the real slack_sdk WebClient."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.webhook import WebhookClient

from runctl_sandbox.fake_slack import FakeSlack, Message, UploadedFile

TOKEN = "xoxb-test"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSlack]:
    with FakeSlack(member_of=["C1"]) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSlack) -> FakeSlack:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeSlack) -> WebClient:
    return WebClient(token=TOKEN, base_url=fake.base_url)


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _button(text: str) -> dict[str, Any]:
    return {"type": "button", "text": {"type": "plain_text", "text": text}, "action_id": "a"}


def test_post_update_thread_and_ephemeral(fake: FakeSlack, client: WebClient) -> None:
    first = client.chat_postMessage(channel="C1", text="starting", blocks=[_section("*starting*")])
    second = client.chat_postMessage(channel="C1", text="other")
    reply = client.chat_postMessage(channel="C1", text="step 1", thread_ts=first["ts"])
    client.chat_update(channel="C1", ts=first["ts"], text="done")
    client.chat_postEphemeral(channel="C1", user="U2", text="only you")

    assert float(first["ts"]) < float(second["ts"]) < float(reply["ts"])
    assert first["message"]["text"] == "starting"
    messages = fake.messages("C1")
    assert [m.text for m in messages] == ["done", "other", "step 1"]
    assert messages[0].blocks == [_section("*starting*")]  # omitted blocks are kept
    assert fake.thread("C1", first["ts"]) == [messages[2]]
    assert [(m.user, m.text) for m in fake.ephemerals()] == [("U2", "only you")]
    assert fake.ephemerals("U3") == []
    assert fake.messages("C2") == []
    assert [c.params["text"] for c in fake.calls_to("chat.postMessage")] == [
        "starting",
        "other",
        "step 1",
    ]


def test_update_delete_and_permalink_need_an_existing_message(client: WebClient) -> None:
    posted = client.chat_postMessage(channel="C1", text="hi")

    link = client.chat_getPermalink(channel="C1", message_ts=posted["ts"])
    client.chat_delete(channel="C1", ts=posted["ts"])
    with pytest.raises(SlackApiError) as err:
        client.chat_update(channel="C1", ts=posted["ts"], text="too late")

    assert str(link["permalink"]).endswith(posted["ts"].replace(".", ""))
    assert err.value.response["error"] == "message_not_found"


def test_users_and_conversations_info(client: WebClient) -> None:
    assert client.users_info(user="U0ALICE")["user"]["name"] == "u0alice"
    assert client.conversations_info(channel="C0OPS")["channel"]["id"] == "C0OPS"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"blocks": [_section("x")] * 51}, "invalid_blocks"),
        ({"blocks": [_section("x" * 3001)]}, "invalid_blocks"),
        ({"blocks": [{"type": "context", "elements": [{"type": "mrkdwn", "text": "x" * 3001}]}]}, "invalid_blocks"),
        ({"blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}]}, "invalid_blocks"),
        ({"blocks": [{"type": "actions", "elements": [_button("b")] * 26}]}, "invalid_blocks"),
        ({"blocks": [{"type": "actions", "elements": [_button("b" * 76)]}]}, "invalid_blocks"),
        ({"text": "t" * 40_001}, "msg_too_long"),
        ({}, "no_text"),
    ],
)
@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing")
def test_slack_limits_are_enforced(client: WebClient, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel="C1", **kwargs)

    assert err.value.response["error"] == error


def test_messages_at_the_limits_are_accepted(fake: FakeSlack, client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="t" * 40_000, blocks=[_section("x" * 3000)] * 50)
    client.chat_postMessage(
        channel="C1",
        text="limits",
        blocks=[
            {"type": "header", "text": {"type": "plain_text", "text": "h" * 150}},
            {"type": "actions", "elements": [_button("b" * 75)] * 25},
        ],
    )

    assert len(fake.messages("C1")) == 2


def test_invalid_blocks_sent_form_encoded_are_rejected(fake: FakeSlack) -> None:
    body = urllib.parse.urlencode({"token": TOKEN, "channel": "C1", "blocks": json.dumps([_section("")])}).encode()

    with urllib.request.urlopen(fake.base_url + "chat.postMessage", data=body) as resp:
        reply = json.load(resp)

    assert reply["ok"] is False
    assert reply["error"] == "invalid_blocks"
    assert fake.calls_to("chat.postMessage")[0].error == "invalid_blocks"


def test_tokens_are_checked(fake: FakeSlack) -> None:
    for token, error in ((None, "not_authed"), ("xoxp-user", "invalid_auth")):
        with pytest.raises(SlackApiError) as err:
            WebClient(token=token, base_url=fake.base_url).auth_test()
        assert err.value.response["error"] == error

    with pytest.raises(SlackApiError) as err:
        WebClient(token=TOKEN, base_url=fake.base_url).api_call("nope.nothing")
    assert err.value.response["error"] == "unknown_method"


def test_files_upload_v2_round_trip(fake: FakeSlack, client: WebClient) -> None:
    data = bytes(range(256)) * 10

    reply = client.files_upload_v2(
        channel="C1",
        content=data,
        filename="loss.png",
        title="Loss curve",
        initial_comment="run r1 finished",
    )

    (uploaded,) = fake.files
    assert uploaded.content == data
    assert (uploaded.filename, uploaded.title, uploaded.channel, uploaded.initial_comment) == (
        "loss.png",
        "Loss curve",
        "C1",
        "run r1 finished",
    )
    assert reply["file"]["id"] == uploaded.id


def test_rate_limit_is_retried_by_the_sdk_handler(fake: FakeSlack) -> None:
    fake.rate_limit("chat.postMessage", times=1, retry_after=0)
    plain = WebClient(token=TOKEN, base_url=fake.base_url)
    with pytest.raises(SlackApiError) as err:
        plain.chat_postMessage(channel="C1", text="no retry")
    assert err.value.response.status_code == 429
    assert err.value.response.headers["Retry-After"] == "0"

    fake.rate_limit("chat.postMessage", times=1, retry_after=0)
    patient = WebClient(
        token=TOKEN,
        base_url=fake.base_url,
        retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)],
    )
    reply = patient.chat_postMessage(channel="C1", text="retried")

    assert reply["ok"] is True
    assert [c.error for c in fake.calls_to("chat.postMessage")] == [
        "ratelimited",
        "ratelimited",
        None,
    ]
    assert [m.text for m in fake.messages("C1")] == ["retried"]


def test_response_url_posts_are_recorded(fake: FakeSlack) -> None:
    hook = WebhookClient(fake.response_url("cmd 1"))

    ok = hook.send(text="working on it", response_type="ephemeral")
    bad = hook.send(text="x", blocks=[_section("x" * 3001)])

    assert (ok.status_code, bad.status_code) == (200, 400)
    calls = fake.calls_to("response_url")
    assert [(c.response_url, c.error) for c in calls] == [("cmd 1", None), ("cmd 1", "invalid_blocks")]
    assert calls[0].params["text"] == "working on it"


def test_events_are_reported_live(fake: FakeSlack, client: WebClient) -> None:
    seen: list[tuple[str, Message | UploadedFile]] = []
    lock = threading.Lock()

    def record(kind: str, item: Message | UploadedFile) -> None:
        with lock:
            seen.append((kind, item))

    fake.on_event(record)
    posted = client.chat_postMessage(channel="C1", text="a")
    client.chat_update(channel="C1", ts=posted["ts"], text="b")
    client.chat_postEphemeral(channel="C1", user="U1", text="c")
    client.files_upload_v2(channel="C1", content=b"d", filename="d.txt")

    kinds = [kind for kind, _ in seen]
    assert kinds == ["post", "update", "ephemeral", "file"]
    assert isinstance(seen[1][1], Message) and seen[1][1].text == "b"
    assert isinstance(seen[3][1], UploadedFile) and seen[3][1].content == b"d"


def test_wait_for_returns_the_value_or_times_out(fake: FakeSlack, client: WebClient) -> None:
    timer = threading.Timer(0.1, lambda: client.chat_postMessage(channel="C1", text="late"))
    timer.start()

    messages = fake.wait_for(lambda: fake.messages("C1"), timeout=5)
    with pytest.raises(TimeoutError):
        fake.wait_for(lambda: fake.messages("C9"), timeout=0.1)

    assert [m.text for m in messages] == ["late"]
    timer.join()


# --- what real Slack refuses (shared/real-services.md, "Slack Web API") -------------


def _error(call: Any) -> str:
    with pytest.raises(SlackApiError) as err:
        call()
    return str(err.value.response["error"])


def test_membership_public_private_dm_files_and_ephemerals(fake: FakeSlack, client: WebClient) -> None:
    # A public channel the bot is not in: chat:write.public posts and updates there...
    posted = client.chat_postMessage(channel="C0PUBLIC", text="hello")
    client.chat_update(channel="C0PUBLIC", ts=posted["ts"], text="edited")
    # ...but an ephemeral or a file share needs membership.
    assert _error(lambda: client.chat_postEphemeral(channel="C0PUBLIC", user="U1", text="x")) == "not_in_channel"
    assert _error(lambda: client.files_upload_v2(channel="C0PUBLIC", content=b"x", filename="x.csv")) == (
        "not_in_channel"
    )
    # Private channels and other people's DMs are invisible until the bot is invited.
    fake.make_private("C0SECRET")
    for channel in ("C0SECRET", "G0LEGACY", "D0THEM"):
        assert _error(lambda c=channel: client.chat_postMessage(channel=c, text="x")) == "channel_not_found"
        assert _error(lambda c=channel: client.conversations_info(channel=c)) == "channel_not_found"
    # A user id is the bot's own DM with that person.
    client.chat_postMessage(channel="U0ALICE", text="direct")

    fake.join("C0SECRET")
    client.chat_postMessage(channel="C0SECRET", text="invited")
    client.files_upload_v2(channel="C0SECRET", content=b"ok", filename="ok.csv")

    assert [m.text for m in fake.messages("C0PUBLIC")] == ["edited"]
    assert [m.text for m in fake.messages("C0SECRET")] == ["invited"]
    assert client.conversations_info(channel="C0SECRET")["channel"]["is_member"] is True
    assert [f.channel for f in fake.files] == ["C0SECRET"]
    assert not fake.is_member("C0PUBLIC")
    fake.reset()
    assert not fake.is_member("C0SECRET") and fake.is_member("C1")  # reset restores the defaults


def test_chat_update_has_a_workspace_budget_with_retry_after(fake: FakeSlack, client: WebClient) -> None:
    ts = [client.chat_postMessage(channel=f"C{n}", text="x")["ts"] for n in range(2)]
    started, sent = time.monotonic(), 0
    with pytest.raises(SlackApiError) as err:
        while sent < 200:  # Tier 3: about 50 a minute, in any channels
            client.chat_update(channel=f"C{sent % 2}", ts=ts[sent % 2], text=f"v{sent}")
            sent += 1

    # A burst of 50, plus what refilled (50 a minute) while they were sent.
    assert 50 <= sent <= 50 + (time.monotonic() - started) * 50 / 60 + 1
    assert err.value.response.status_code == 429
    assert int(err.value.response.headers["Retry-After"]) >= 1


def test_chat_post_message_has_a_budget_per_channel(fake: FakeSlack, client: WebClient) -> None:
    started, sent = time.monotonic(), 0
    with pytest.raises(SlackApiError) as err:
        while sent < 100:  # a short burst passes, then about one a second
            client.chat_postMessage(channel="C1", text=f"m{sent}")
            sent += 1
    client.chat_postMessage(channel="C2", text="another channel has its own budget")

    assert 10 <= sent <= 10 + (time.monotonic() - started) + 1
    assert err.value.response.status_code == 429 and err.value.response.headers["Retry-After"] == "1"


def test_server_errors_on_demand_and_the_sdk_retry(fake: FakeSlack, client: WebClient) -> None:
    from slack_sdk.http_retry.builtin_handlers import ServerErrorRetryHandler

    fake.fail("chat.postMessage")
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel="C1", text="bad day")
    assert err.value.response.status_code == 500

    fake.fail("chat.postMessage")
    patient = WebClient(token=TOKEN, base_url=fake.base_url, retry_handlers=[ServerErrorRetryHandler(1)])
    patient.chat_postMessage(channel="C1", text="second try")

    assert [c.error for c in fake.calls_to("chat.postMessage")] == ["http_500", "http_500", None]
    assert [m.text for m in fake.messages("C1")] == ["second try"]


def test_a_response_url_takes_five_messages(fake: FakeSlack) -> None:
    hook = WebhookClient(fake.response_url("cmd 2"))

    statuses = [hook.send(text=f"n{n}").status_code for n in range(6)]

    assert statuses == [200] * 5 + [404]
    assert [m.text for m in fake.responses("cmd 2")] == [f"n{n}" for n in range(5)]


def test_users_have_names(fake: FakeSlack, client: WebClient) -> None:
    fake.add_user("U0ALICE", "alice", display_name="Alice")

    profile = client.users_info(user="U0ALICE")["user"]["profile"]

    assert profile["display_name"] == "Alice"


def test_file_uploads_are_refused_as_slack_refuses_them(fake: FakeSlack, client: WebClient) -> None:
    """files.getUploadURLExternal takes a whole number of bytes, never 0 and at most 1 GB, and
    alt text up to 1,000 characters; completeUploadExternal's thread_ts needs exactly one channel."""
    assert _error(lambda: client.files_getUploadURLExternal(filename="a.log", length=0)) == "missing_argument"
    assert _error(lambda: client.api_call("files.getUploadURLExternal", params={"filename": "a", "length": "x"})) == (
        "invalid_arguments"
    )
    assert _error(lambda: client.files_getUploadURLExternal(filename="a.log", length=1024**3 + 1)) == (
        "file_upload_size_restricted"
    )
    assert _error(lambda: client.files_getUploadURLExternal(filename="a.png", length=2, alt_txt="x" * 1001)) == (
        "alt_txt_too_large"
    )
    parent = client.chat_postMessage(channel="C1", text="parent")["ts"]
    fake.join("C2")
    got = client.files_getUploadURLExternal(filename="a.log", length=2)
    urllib.request.urlopen(urllib.request.Request(got["upload_url"], data=b"ok", method="POST")).read()
    files = [{"id": got["file_id"], "title": "a.log"}]
    assert _error(
        lambda: client.files_completeUploadExternal(files=files, channels=["C1", "C2"], thread_ts=parent)
    ) == ("invalid_arguments")
    client.files_completeUploadExternal(files=files, channel_id="C1", thread_ts=parent)
    assert [(f.channel, f.thread_ts, f.content) for f in fake.files] == [("C1", parent, b"ok")]
