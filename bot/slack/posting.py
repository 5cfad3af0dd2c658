"""The Slack adapter's outbound side: everything the bot posts.

- Replies go in the thread, converted to mrkdwn and split below Slack's limits; a "working
  on it" message shows progress and is replaced by the answer.
- While a reply is generated it streams into one message (bot/slack/streaming.py), which
  the committed reply then finishes.
- A handoff alert goes to the support channel, with who to ping and a link to the
  conversation.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import ClientError
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.chunking import split_message
from bot.outbox import PermanentPostError, PostedParts
from bot.slack.format import escape, markdown_to_mrkdwn
from bot.slack.streaming import SlackStreams
from bot.slack.working import WorkingMessages
from bot.streaming import streamed_messages
from core import metrics
from core.conversation import ConversationKey, Reply
from core.keys import Keys
from core.redis_conn import Redis
from core.settings import Settings

log = logging.getLogger(__name__)

PLATFORM = "slack"

# Slack accepts up to 40k characters but shows long messages collapsed; 3,000 keeps each
# part readable and well under every limit.
MESSAGE_LIMIT = 3000
WORKING_TEXT = "_Working on it…_"
# Errors after which posting again cannot succeed.
PERMANENT_ERRORS = {
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "msg_too_long",
    "no_text",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "restricted_action",
}
# Buttons each reply action shows: (action_id, label, style)
BUTTONS: dict[str, list[tuple[str, str, str | None]]] = {
    "feedback": [("feedback_up", "👍 Helpful", None), ("feedback_down", "👎 Not helpful", None)],
    "handoff": [("handoff_request", "Talk to a person", "primary")],
    "release": [("handoff_release", "Hand back to the bot", None)],
    "forget": [("forget_confirm", "Yes, delete my data", "danger")],
}


def web_client(settings: Settings) -> AsyncWebClient:
    """Web API client with Slack's rate limits (429 + Retry-After) and flaky networks
    handled by retrying; `SLACK_API_URL` sets the base (slack_sdk reads no variable).
    Failed and retried calls are counted (`core.metrics`), by API method."""
    return _CountedWebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_url,
        retry_handlers=[
            _CountedRateLimitRetries(max_retry_count=5),
            _CountedConnectionRetries(max_retry_count=3),
        ],
    )


class _CountedWebClient(AsyncWebClient):
    async def api_call(self, api_method: str, **kwargs: Any) -> Any:
        try:
            return await super().api_call(api_method, **kwargs)
        except (SlackApiError, ClientError, TimeoutError):
            metrics.api_error(PLATFORM, api_method)
            raise


def _api_method(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


class _CountedRateLimitRetries(AsyncRateLimitErrorRetryHandler):
    async def prepare_for_next_attempt_async(self, **kwargs: Any) -> None:
        metrics.api_retry(PLATFORM, _api_method(kwargs["request"].url))
        await super().prepare_for_next_attempt_async(**kwargs)


class _CountedConnectionRetries(AsyncConnectionErrorRetryHandler):
    async def prepare_for_next_attempt_async(self, **kwargs: Any) -> None:
        metrics.api_retry(PLATFORM, _api_method(kwargs["request"].url))
        await super().prepare_for_next_attempt_async(**kwargs)


class SlackPoster:
    """Posts replies (for the outbox), handoff alerts, the "working on it" message and
    short answers to commands and buttons."""

    def __init__(self, client: AsyncWebClient, redis: Redis, keys: Keys) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys
        self.working = WorkingMessages(redis, keys)
        self.streams = SlackStreams(client, self.working, MESSAGE_LIMIT)

    # -- the "is thinking…" status -----------------------------------------------------

    async def show_thinking(self, conversation: ConversationKey, message_id: str) -> None:
        """Slack's "is thinking…" status in the thread until the first words; the "working
        on it" message where the status cannot be set."""
        if not await self.streams.set_thinking(conversation):
            await self.show_working(conversation, message_id)

    # -- replies (from the outbox) ------------------------------------------------------

    async def post_reply(self, reply: Reply, parts: PostedParts) -> None:
        if reply.kind == "support":
            await self._post_support_alert(reply, parts)
            return
        conversation = reply.conversation
        chunks = split_message(markdown_to_mrkdwn(reply.text), MESSAGE_LIMIT)
        streamed = streamed_messages(parts.done)
        for index, chunk in enumerate(chunks):
            if index in parts.done:
                continue  # posted before a crash or a retry
            # Buttons go under the last part.
            blocks = _blocks(chunk, reply) if index == len(chunks) - 1 else None
            try:
                if index == 0 and 0 in streamed:  # shown while it was generated
                    await self.streams.finish(reply, streamed[0], chunk, blocks, len(chunks) == 1)
                    await parts.record(0, streamed[0])
                    continue
                if index == 0 and await self._replace_placeholder(reply, chunk, parts, blocks):
                    continue
                response = await self.client.chat_postMessage(
                    channel=conversation.channel,
                    thread_ts=conversation.thread or None,
                    text=chunk,
                    blocks=blocks,
                    unfurl_links=False,
                )
            except SlackApiError as exc:
                error = str(exc.response.get("error", ""))
                if error in PERMANENT_ERRORS:
                    raise PermanentPostError(f"Slack refused it: {error}") from exc
                raise
            await parts.record(index, str(response["ts"]))

    async def _post_support_alert(self, reply: Reply, parts: PostedParts) -> None:
        """The handoff alert in the support channel: who to ping, who asked, a link."""
        if 0 in parts.done:
            return
        conversation = reply.conversation
        link = await self._permalink(conversation.channel, conversation.thread or reply.reply_to)
        # The alert names the customer: their display name is shown, never interpreted.
        alert = escape(reply.text)
        text = f"{_mention(str(reply.meta.get('mention', '')))}:rotating_light: {alert}"
        text += (
            f" <{link}|Open the conversation>" if link else f" (channel <#{conversation.channel}>)"
        )
        release = Reply(reply.reply_id, conversation, text, "", 0, meta={"actions": ["release"]})
        try:
            response = await self.client.chat_postMessage(
                channel=str(reply.meta["target_channel"]),
                text=text,
                blocks=_blocks(text, release),
                unfurl_links=False,
            )
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            if error in PERMANENT_ERRORS:
                raise PermanentPostError(
                    f"Slack refused the handoff alert in {reply.meta.get('target_channel')}: "
                    f"{error} (invite the bot to the support channel)"
                ) from exc
            raise
        await parts.record(0, str(response["ts"]))

    async def _permalink(self, channel: str, ts: str) -> str:
        if not ts:
            return ""
        try:
            response = await self.client.chat_getPermalink(channel=channel, message_ts=ts)
            return str(response["permalink"])
        except (SlackApiError, ClientError, KeyError) as exc:
            log.warning("no permalink for %s in %s: %s", ts, channel, exc)
            return ""

    # -- the "working on it" message ----------------------------------------------------

    async def show_working(self, conversation: ConversationKey, message_id: str) -> None:
        """Post one "working on it" message per conversation; the reply replaces it (see
        bot/slack/working.py for a reply that comes first)."""
        if not await self.working.claim(conversation, message_id):
            return
        try:
            response = await self.client.chat_postMessage(
                channel=conversation.channel,
                thread_ts=conversation.thread or None,
                text=WORKING_TEXT,
            )
        except (SlackApiError, ClientError) as exc:
            log.warning("could not post the working message in %s: %s", conversation.id, exc)
            await self.working.abandon(conversation, message_id)
            return
        ts = str(response["ts"])
        if not await self.working.posted(conversation, message_id, ts):
            # The answer went out as a message of its own meanwhile: tidy up.
            with contextlib.suppress(SlackApiError, ClientError):
                await self.client.chat_delete(channel=conversation.channel, ts=ts)

    async def _replace_placeholder(
        self,
        reply: Reply,
        text: str,
        parts: PostedParts,
        blocks: list[dict[str, Any]] | None = None,
    ) -> bool:
        conversation = reply.conversation
        placeholder = await self.working.take(conversation, reply.reply_to)
        if not placeholder:
            return False
        try:
            await self.client.chat_update(
                channel=conversation.channel, ts=placeholder, text=text, blocks=blocks or []
            )
        except SlackApiError as exc:
            log.warning("could not replace the working message %s: %s", placeholder, exc)
            return False
        await parts.record(0, str(placeholder))
        return True

    # -- short answers ------------------------------------------------------------------

    async def say(self, conversation: ConversationKey, text: str) -> None:
        try:
            await self.client.chat_postMessage(
                channel=conversation.channel, thread_ts=conversation.thread or None, text=text
            )
        except (SlackApiError, ClientError) as exc:
            log.warning("could not answer in %s: %s", conversation.id, exc)

    async def ephemeral(self, channel: str, user: str, text: str) -> None:
        try:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
        except (SlackApiError, ClientError) as exc:
            log.warning("could not answer %s in %s: %s", user, channel, exc)


def _blocks(text: str, reply: Reply) -> list[dict[str, Any]] | None:
    """A section with the text and, when the reply asks for them, its buttons."""
    value = {
        "feedback": reply.reply_id,
        "handoff": reply.conversation.id,
        "release": reply.conversation.id,
        "forget": reply.conversation.id,
    }
    elements = []
    for action in reply.actions:
        for action_id, label, style in BUTTONS.get(action, []):
            button: dict[str, Any] = {
                "type": "button",
                "action_id": action_id,
                "text": {"type": "plain_text", "text": label, "emoji": True},
                "value": value[action],
            }
            if style:
                button["style"] = style
            elements.append(button)
    if not elements:
        return None
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "actions", "block_id": "actions", "elements": elements},
    ]


def _mention(target: str) -> str:
    """Slack markup that notifies a user group (S…) or a user (U…/W…)."""
    if target.startswith("S"):
        return f"<!subteam^{target}> "
    if target[:1] in ("U", "W"):
        return f"<@{target}> "
    return ""
