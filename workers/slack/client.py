"""The Slack side of the workers: every post, update and upload goes through here."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.models.blocks import Block
from slack_sdk.webhook import WebhookClient

from workers.settings import Settings

log = logging.getLogger(__name__)
MAX_TEXT = 3000  # per section text; Slack rejects more


def make_client(settings: Settings) -> WebClient:
    kwargs: dict[str, str] = {}
    if settings.SLACK_API_URL:
        kwargs["base_url"] = settings.SLACK_API_URL
    token = settings.SLACK_BOT_TOKEN.get_secret_value() if settings.SLACK_BOT_TOKEN else None
    client = WebClient(token=token, **kwargs)  # type: ignore[arg-type]
    client.retry_handlers = retry_handlers()
    return client


def retry_handlers(rate_limits: bool = True) -> list[RetryHandler]:
    """Slack's bad days: a dropped connection and a 500/503 are retried with backoff; a 429
    waits its Retry-After (except where the caller reschedules instead of sleeping)."""
    handlers: list[RetryHandler] = [
        ConnectionErrorRetryHandler(max_retry_count=2),
        ServerErrorRetryHandler(max_retry_count=2),
    ]
    if rate_limits:
        handlers.append(RateLimitErrorRetryHandler(max_retry_count=3))
    return handlers


def clamp(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 20].rstrip() + "\n… (truncated)"


class Notifier:
    def __init__(self, client: WebClient) -> None:
        self.client = client
        # The same client minus the 429 handler, for callers that reschedule instead of sleeping.
        self.impatient = WebClient(
            token=client.token,
            base_url=client.base_url,
            timeout=client.timeout,
            retry_handlers=[h for h in client.retry_handlers if not isinstance(h, RateLimitErrorRetryHandler)],
        )

    def post(
        self,
        channel: str,
        text: str,
        blocks: Sequence[Block] | None = None,
        thread_ts: str | None = None,
        wait: bool = True,
    ) -> str:
        """With wait=False a 429 raises at once (SlackApiError, status 429, Retry-After)."""
        client = self.client if wait else self.impatient
        resp = client.chat_postMessage(channel=channel, text=clamp(text, 3900), blocks=blocks, thread_ts=thread_ts)
        return str(resp["ts"])

    def update(
        self, channel: str, ts: str, text: str, blocks: Sequence[Block] | None = None, wait: bool = True
    ) -> None:
        """With wait=False a 429 raises at once (SlackApiError, status 429, Retry-After)."""
        client = self.client if wait else self.impatient
        client.chat_update(channel=channel, ts=ts, text=clamp(text, 3900), blocks=blocks or [])

    def try_post(
        self,
        channel: str,
        text: str,
        blocks: Sequence[Block] | None = None,
        thread_ts: str | None = None,
        *,
        what: str,
    ) -> str | None:
        """`post` for a message that only reports: Slack's refusal is logged (`could not post <what>`),
        not raised; None then."""
        try:
            return self.post(channel, text, blocks, thread_ts)
        except SlackApiError as exc:
            log.warning("could not post %s: %s", what, exc.response.get("error"))
            return None

    def try_update(self, channel: str, ts: str, text: str, blocks: Sequence[Block] | None = None, *, what: str) -> bool:
        """`update` for a message that only shows what already happened: Slack's refusal is logged
        (`could not update <what>`), not raised; False then."""
        try:
            self.update(channel, ts, text, blocks)
        except SlackApiError as exc:
            log.warning("could not update %s: %s", what, exc.response.get("error"))
            return False
        return True

    def ephemeral(
        self,
        channel: str,
        user: str,
        text: str,
        blocks: Sequence[Block] | None = None,
        response_url: str | None = None,
    ) -> None:
        """`privately`, with the workers' client."""
        privately(self.client, channel, user, text, blocks, response_url)

    def respond(self, response_url: str, text: str, blocks: Sequence[Block] | None = None) -> bool:
        return respond(response_url, text, blocks)

    def upload(
        self,
        channel: str,
        filename: str,
        content: bytes,
        title: str,
        comment: str = "",
        thread_ts: str | None = None,
        alt: str = "",
    ) -> None:
        """`alt`: an image's description for screen readers (Slack's `alt_txt`, at most 1,000 characters)."""
        self.client.files_upload_v2(
            channel=channel,
            filename=filename,
            content=content,
            title=title,
            alt_txt=alt or None,
            initial_comment=comment or None,
            thread_ts=thread_ts,
        )


def privately(
    client: WebClient,
    channel: str,
    user: str,
    text: str,
    blocks: Sequence[Block] | None = None,
    response_url: str | None = None,
) -> None:
    """The one way to tell a person something only they see: ephemeral in the channel; where
    the bot is not in the channel (or there is none: a modal), through the request's
    response_url (any conversation); else a DM. A refused DM is logged, not raised."""
    if channel:
        try:
            client.chat_postEphemeral(channel=channel, user=user, text=clamp(text, 3900), blocks=blocks)
            return
        except SlackApiError as exc:
            log.warning("ephemeral to %s in %s failed (%s)", user, channel, exc.response.get("error"))
    if response_url and respond(response_url, text, blocks):
        return
    try:
        client.chat_postMessage(channel=user, text=clamp(text, 3900), blocks=blocks)
    except SlackApiError as exc:
        log.warning("could not tell %s privately: %s", user, exc.response.get("error"))


def respond(response_url: str, text: str, blocks: Sequence[Block] | None = None) -> bool:
    """Answer through a request's response_url, privately; False when Slack refuses
    (expired after 30 minutes or 5 messages). The URL itself is never logged."""
    hook = WebhookClient(response_url, retry_handlers=retry_handlers())
    try:
        resp = hook.send(text=clamp(text, 3900), blocks=blocks, response_type="ephemeral", replace_original=False)
    except OSError as exc:
        log.warning("response_url unreachable: %s", type(exc).__name__)
        return False
    if resp.status_code != 200:
        log.warning("response_url refused the message: HTTP %s %s", resp.status_code, resp.body[:100])
        return False
    return True
