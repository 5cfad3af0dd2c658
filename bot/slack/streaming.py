"""Slack replies that grow while they are generated (bot/streaming.py decides when).

One message per reply: Slack's chat.startStream / chat.appendStream, finished by
chat.stopStream, which brings the buttons. Where those methods are unavailable
(unknown_method, not_allowed, a missing scope…), or Slack has expired the stream
(message_not_in_streaming_state, after about 5 minutes), the message is edited with
chat.update instead. The "is thinking…" status shows until the first words.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import ClientError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.chunking import split_message
from bot.outbox import PostedParts
from bot.slack.format import markdown_to_mrkdwn
from bot.slack.working import WorkingMessages
from bot.streaming import stream_part, streamed_messages
from core.conversation import ConversationKey, Reply

log = logging.getLogger(__name__)

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


class SlackStreams:
    """The messages this process streams replies into."""

    def __init__(self, client: AsyncWebClient, working: WorkingMessages, message_limit: int):
        self.client = client
        self.working = working
        self.message_limit = message_limit
        self.native = True  # until Slack says the streaming methods are unavailable
        self.streaming: dict[str, _Stream] = {}  # reply id -> its message

    async def show_partial(self, reply: Reply, text: str, parts: PostedParts) -> None:
        """Show a reply still being generated (its first part: the rest comes with the
        final reply) in its streamed message, opening that the first time."""
        text = split_message(text, self.message_limit)[0]
        stream = self.streaming.get(reply.reply_id)
        if stream is None and 0 in streamed_messages(parts.done):
            # Taken over (another replica, a restart, a regenerated reply): what the
            # message shows is unknown, so it is edited whole from now on.
            stream = _Stream(streamed_messages(parts.done)[0], native=False)
            await self.stop(reply, stream.ts)
            self.streaming[reply.reply_id] = stream
        if stream is None:
            self.streaming[reply.reply_id] = await self._open(reply, text, parts)
            return
        if stream.native and not text.startswith(stream.shown):
            # The reply is being generated again (a worker took it over): start over in
            # the same message, edited whole.
            await self.stop(reply, stream.ts)
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

    async def _open(self, reply: Reply, text: str, parts: PostedParts) -> _Stream:
        conversation = reply.conversation
        placeholder = await self.working.take(conversation, reply.reply_to)
        if placeholder:  # the "working on it" message becomes the reply
            await self.client.chat_update(
                channel=conversation.channel, ts=placeholder, text=markdown_to_mrkdwn(text)
            )
            await parts.record(stream_part(0), placeholder)
            return _Stream(placeholder, native=False, shown=text)
        if self.native and conversation.thread:
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
                self.native = False
        response = await self.client.chat_postMessage(
            channel=conversation.channel,
            thread_ts=conversation.thread or None,
            text=markdown_to_mrkdwn(text),
            unfurl_links=False,
        )
        ts = str(response["ts"])
        await parts.record(stream_part(0), ts)
        return _Stream(ts, native=False, shown=text)

    async def stop(self, reply: Reply, ts: str, **final: Any) -> bool:
        """Stop a native stream (with its final text and buttons); False if Slack has
        expired it or cannot (the message is then edited)."""
        try:
            await self.client.chat_stopStream(channel=reply.conversation.channel, ts=ts, **final)
            return True
        except SlackApiError as exc:
            if _error(exc) != STREAM_EXPIRED and _error(exc) not in NO_STREAMING:
                log.warning("could not stop the stream %s: %s", ts, _error(exc))
            return False

    async def finish(
        self, reply: Reply, ts: str, chunk: str, blocks: list[dict[str, Any]] | None, single: bool
    ) -> None:
        """Turn the streamed message into the reply's first part."""
        stream = self.streaming.pop(reply.reply_id, None)
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
                if await self.stop(reply, ts, **final):
                    return
            else:
                await self.stop(reply, ts)
        await self.client.chat_update(
            channel=reply.conversation.channel, ts=ts, text=chunk, blocks=blocks or []
        )

    async def set_thinking(self, conversation: ConversationKey) -> bool:
        """Slack's "is thinking…" status in the thread; False where it cannot be set."""
        if not (conversation.thread and self.native):
            return False
        try:
            await self.client.assistant_threads_setStatus(
                channel_id=conversation.channel,
                thread_ts=conversation.thread,
                status=THINKING_STATUS,
            )
            return True
        except SlackApiError as exc:
            log.info("no thinking status in %s (%s)", conversation.id, _error(exc))
        except ClientError as exc:
            log.warning("no thinking status in %s: %s", conversation.id, exc)
        return False


class _Stream:
    """A message this process is streaming a reply into."""

    def __init__(self, ts: str, *, native: bool, shown: str = "") -> None:
        self.ts = ts
        self.native = native  # chat.appendStream; else chat.update
        self.shown = shown


def _error(exc: SlackApiError) -> str:
    return str(exc.response.get("error", ""))
