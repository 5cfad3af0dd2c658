"""The Slack adapter's outbound side: everything the bot posts.

- Replies go in the thread, converted to mrkdwn and split below Slack's limits; a "working
  on it" message shows progress and is replaced by the answer.
- While a reply is generated it streams into one message (`show_partial`): Slack's
  chat.startStream / appendStream / stopStream, the buttons arriving with stopStream. Where
  those methods are unavailable (unknown_method, not_allowed…), or Slack has expired the
  stream (message_not_in_streaming_state, after about 5 minutes), the message is edited
  with chat.update instead, paced by bot/streaming.py.
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
from bot.streaming import stream_part, streamed_messages
from core.conversation import ConversationKey, Reply
from core.keys import PLACEHOLDER_TTL_S, Keys
from core.redis_conn import Redis
from core.settings import Settings

log = logging.getLogger(__name__)

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
# Errors that mean the streaming methods cannot be used here: edit with chat.update instead.
NO_STREAMING = {
    "unknown_method",
    "not_allowed",
    "not_allowed_token_type",
    "missing_scope",
    "method_deprecated",
    "feature_not_enabled",
}
STREAM_EXPIRED = "message_not_in_streaming_state"
THINKING_STATUS = "is thinking…"
# Buttons each reply action shows: (action_id, label, style)
BUTTONS: dict[str, list[tuple[str, str, str | None]]] = {
    "feedback": [("feedback_up", "👍 Helpful", None), ("feedback_down", "👎 Not helpful", None)],
    "handoff": [("handoff_request", "Talk to a person", "primary")],
    "release": [("handoff_release", "Hand back to the bot", None)],
    "forget": [("forget_confirm", "Yes, delete my data", "danger")],
}


def web_client(settings: Settings) -> AsyncWebClient:
    """Web API client with Slack's rate limits (429 + Retry-After) and flaky networks
    handled by retrying; `SLACK_API_URL` sets the base (slack_sdk reads no variable)."""
    return AsyncWebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_url,
        retry_handlers=[
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncConnectionErrorRetryHandler(max_retry_count=3),
        ],
    )


class SlackPoster:
    """Posts replies (for the outbox), handoff alerts, the "working on it" message and
    short answers to commands and buttons."""

    def __init__(self, client: AsyncWebClient, redis: Redis, keys: Keys) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys
        self.native_streaming = True  # until Slack says the methods are unavailable
        self._streams: dict[str, _Stream] = {}  # reply id -> the message this process streams

    # -- replies while they are generated -----------------------------------------------

    async def show_partial(self, reply: Reply, text: str, parts: PostedParts) -> None:
        """Show a reply still being generated (its first part: the rest comes with the
        final reply) in its streamed message, opening that the first time."""
        text = split_message(text, MESSAGE_LIMIT)[0]
        stream = self._streams.get(reply.reply_id)
        if stream is None and 0 in streamed_messages(parts.done):
            # Taken over (another replica, a restart, a regenerated reply): what the
            # message shows is unknown, so it is edited whole from now on.
            stream = _Stream(streamed_messages(parts.done)[0], native=False)
            await self._stop_stream(reply, stream.ts)
            self._streams[reply.reply_id] = stream
        if stream is None:
            self._streams[reply.reply_id] = await self._open_stream(reply, text, parts)
            return
        if stream.native and not text.startswith(stream.shown):
            # The reply is being generated again (a worker took it over): start over in
            # the same message, edited whole.
            await self._stop_stream(reply, stream.ts)
            stream.native = False
        if stream.native:
            try:
                await self.client.chat_appendStream(
                    channel=reply.conversation.channel,
                    ts=stream.ts,
                    markdown_text=text[len(stream.shown) :],
                )
                stream.shown = text
                return
            except SlackApiError as exc:
                if _error(exc) != STREAM_EXPIRED and _error(exc) not in NO_STREAMING:
                    raise
                log.info("stream %s: %s; editing it instead", stream.ts, _error(exc))
                stream.native = False
        await self.client.chat_update(
            channel=reply.conversation.channel, ts=stream.ts, text=markdown_to_mrkdwn(text)
        )
        stream.shown = text

    async def _open_stream(self, reply: Reply, text: str, parts: PostedParts) -> _Stream:
        conversation = reply.conversation
        stored = await self.redis.getdel(self.keys.placeholder(conversation))
        placeholder = str(stored) if stored and stored != "posting" else ""
        if placeholder:  # the "working on it" message becomes the reply
            await self.client.chat_update(
                channel=conversation.channel, ts=placeholder, text=markdown_to_mrkdwn(text)
            )
            await parts.record(stream_part(0), placeholder)
            return _Stream(placeholder, native=False, shown=text)
        if self.native_streaming and conversation.thread:
            try:
                response = await self.client.chat_startStream(
                    channel=conversation.channel,
                    thread_ts=conversation.thread,
                    markdown_text=text,
                    recipient_team_id=conversation.workspace,
                    recipient_user_id=str(reply.meta.get("user", "")) or None,
                )
                ts = str(response["ts"])
                await parts.record(stream_part(0), ts)
                return _Stream(ts, native=True, shown=text)
            except SlackApiError as exc:
                if _error(exc) not in NO_STREAMING:
                    raise
                log.warning(
                    "Slack's streaming methods are unavailable (%s): replies grow by "
                    "chat.update instead",
                    _error(exc),
                )
                self.native_streaming = False
        response = await self.client.chat_postMessage(
            channel=conversation.channel,
            thread_ts=conversation.thread or None,
            text=markdown_to_mrkdwn(text),
            unfurl_links=False,
        )
        ts = str(response["ts"])
        await parts.record(stream_part(0), ts)
        return _Stream(ts, native=False, shown=text)

    async def _stop_stream(self, reply: Reply, ts: str, **final: Any) -> bool:
        """Stop a native stream (with its final text and buttons); False if Slack has
        expired it or cannot (the message is then edited)."""
        try:
            await self.client.chat_stopStream(channel=reply.conversation.channel, ts=ts, **final)
            return True
        except SlackApiError as exc:
            if _error(exc) != STREAM_EXPIRED and _error(exc) not in NO_STREAMING:
                log.warning("could not stop the stream %s: %s", ts, _error(exc))
            return False

    async def _finish_stream(
        self, reply: Reply, ts: str, chunk: str, blocks: list[dict[str, Any]] | None, single: bool
    ) -> None:
        """Turn the streamed message into the reply's first part."""
        stream = self._streams.pop(reply.reply_id, None)
        if stream is not None and stream.native:
            if single and reply.text.startswith(stream.shown):
                # The rest of the text and the buttons arrive with stopStream.
                rest = reply.text[len(stream.shown) :]
                actions = [b for b in blocks or [] if b.get("type") == "actions"]
                final: dict[str, Any] = {}
                if rest:
                    final["markdown_text"] = rest
                if actions:
                    final["blocks"] = actions
                if await self._stop_stream(reply, ts, **final):
                    return
            else:
                await self._stop_stream(reply, ts)
        await self.client.chat_update(
            channel=reply.conversation.channel, ts=ts, text=chunk, blocks=blocks or []
        )

    async def show_thinking(self, conversation: ConversationKey) -> None:
        """Slack's "is thinking…" status in the thread until the first words; the "working
        on it" message where the status cannot be set."""
        if conversation.thread and self.native_streaming:
            try:
                await self.client.assistant_threads_setStatus(
                    channel_id=conversation.channel,
                    thread_ts=conversation.thread,
                    status=THINKING_STATUS,
                )
                return
            except SlackApiError as exc:
                log.info("no thinking status in %s (%s)", conversation.id, _error(exc))
            except ClientError as exc:
                log.warning("no thinking status in %s: %s", conversation.id, exc)
        await self.show_working(conversation)

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
                    await self._finish_stream(reply, streamed[0], chunk, blocks, len(chunks) == 1)
                    await parts.record(0, streamed[0])
                    continue
                if index == 0 and await self._replace_placeholder(
                    conversation, chunk, parts, blocks
                ):
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

    async def show_working(self, conversation: ConversationKey) -> None:
        """Post one "working on it" message per conversation; the reply replaces it."""
        key = self.keys.placeholder(conversation)
        if not await self.redis.set(key, "posting", nx=True, ex=PLACEHOLDER_TTL_S):
            return
        try:
            response = await self.client.chat_postMessage(
                channel=conversation.channel,
                thread_ts=conversation.thread or None,
                text=WORKING_TEXT,
            )
        except (SlackApiError, ClientError) as exc:
            log.warning("could not post the working message in %s: %s", conversation.id, exc)
            await self.redis.delete(key)
            return
        ts = str(response["ts"])
        if not await self.redis.set(key, ts, xx=True, ex=PLACEHOLDER_TTL_S):
            # The answer came while this was being posted and went out as a message of
            # its own: tidy up.
            with contextlib.suppress(SlackApiError, ClientError):
                await self.client.chat_delete(channel=conversation.channel, ts=ts)

    async def _replace_placeholder(
        self,
        conversation: ConversationKey,
        text: str,
        parts: PostedParts,
        blocks: list[dict[str, Any]] | None = None,
    ) -> bool:
        stored = await self.redis.getdel(self.keys.placeholder(conversation))
        placeholder = str(stored) if stored else ""
        if not placeholder or placeholder == "posting":
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


class _Stream:
    """A message this process is streaming a reply into."""

    def __init__(self, ts: str, *, native: bool, shown: str = "") -> None:
        self.ts = ts
        self.native = native  # chat.appendStream; else chat.update
        self.shown = shown


def _error(exc: SlackApiError) -> str:
    return str(exc.response.get("error", ""))


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
