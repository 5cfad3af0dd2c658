"""The Slack adapter, on slack-bolt (async): events in, replies out, nothing else.

- A mention in a channel starts a conversation in a thread under that message; in a thread
  the bot has joined it answers follow-ups without a new mention; DMs are answered.
- Slack team + channel + thread root is the conversation (a top-level DM: the DM itself).
- Events are acknowledged at once (bolt acks before listeners run); generation happens in
  the workers. Retries and the double delivery of a mention (`app_mention` and `message`)
  are deduplicated in Redis by the message `ts`, so replicas post one reply.
- Replies go in the thread, converted to mrkdwn and split below Slack's limits; a "working
  on it" message shows progress and is replaced by the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from aiohttp import ClientError, web
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.chunking import split_message
from bot.outbox import OutboxConsumer, PermanentPostError, PostedParts
from bot.slack.format import markdown_to_mrkdwn
from core.conversation import ConversationKey, Reply
from core.errors import SettingsError
from core.support.feedback import Feedback
from core.support.handoff import Handoffs, release_and_announce
from core.inbound import Outcome, submit_user_message
from core.jobs import JobQueue
from core.keys import DISPLAY_NAME_TTL_S, PLACEHOLDER_TTL_S, Keys
from core.redis_conn import Redis
from core.settings import Settings
from core.store import ConversationStore

log = logging.getLogger(__name__)

PLATFORM = "slack"
# Slack accepts up to 40k characters but shows long messages collapsed; 3,000 keeps each
# part readable and well under every limit.
MESSAGE_LIMIT = 3000
WORKING_TEXT = "_Working on it…_"
RESET_DONE = (
    "Done: I've forgotten our conversation in this channel. "
    "(Each thread has its own history; start a new thread to start afresh there.)"
)
ASK_USAGE = "Ask me anything, for example: `/ask how do I reset my password?`"
NOT_IN_CHANNEL = "I can't post in this channel yet: invite me with `/invite @` and my name."
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
_MENTION = re.compile(r"<@([UW][A-Z0-9]+)>")
HANDOFF_REQUEST_TEXT = "talk to a person"
FEEDBACK_THANKS = "Thanks for the feedback! It helps us improve the answers."
FEEDBACK_EXPIRED = "Sorry, that answer is too old to rate now."
RELEASE_NOT_ACTIVE = "This conversation is already back with the bot."
# Buttons each reply action shows: (action_id, label, style)
BUTTONS: dict[str, list[tuple[str, str, str | None]]] = {
    "feedback": [("feedback_up", "👍 Helpful", None), ("feedback_down", "👎 Not helpful", None)],
    "handoff": [("handoff_request", "Talk to a person", "primary")],
    "release": [("handoff_release", "Hand back to the bot", None)],
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


class SlackAdapter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        if not settings.slack_bot_token:
            raise SettingsError("SLACK_BOT_TOKEN is not set")
        if not (settings.slack_signing_secret or settings.slack_app_token):
            raise SettingsError(
                "set SLACK_SIGNING_SECRET (Events API over HTTP) or SLACK_APP_TOKEN (Socket Mode)"
            )
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.store = ConversationStore.from_settings(redis, settings)
        self.queue = JobQueue(redis, self.keys)
        self.client = web_client(settings)
        self.app = AsyncApp(
            client=self.client,
            signing_secret=settings.slack_signing_secret or "",
            # Without this, bolt answers unhandled events with 404 and Slack retries them.
            raise_error_for_unhandled_request=False,
        )
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.command("/ask")(self._on_ask)
        self.app.command("/reset")(self._on_reset)
        self.app.action("feedback_up")(self._on_feedback)
        self.app.action("feedback_down")(self._on_feedback)
        self.app.action("handoff_request")(self._on_handoff_request)
        self.app.action("handoff_release")(self._on_handoff_release)
        self.feedback = Feedback(redis, self.keys, settings.history_ttl_s)
        self.handoffs = Handoffs(redis, self.keys, settings.history_ttl_s)
        # Everything else (reactions, channel events…) is acknowledged and ignored: an
        # unanswered event would be retried by Slack and count against the app.
        self.app.event(re.compile(".*"))(_ignore)
        self.app.error(self._on_error)
        self.outbox = OutboxConsumer(
            redis, self.keys, PLATFORM, self._post_reply, reclaim_idle_s=settings.reclaim_idle_s
        )

    # -- inbound ------------------------------------------------------------------------

    async def _on_mention(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        if not _from_a_person(event, context):
            return
        root = event.get("thread_ts") or event["ts"]
        conversation = self._conversation(event, context, root)
        await self.redis.set(self.keys.joined(conversation), "1", ex=self.settings.history_ttl_s)
        await self._submit(conversation, event, context)

    async def _on_message(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        # Edits, deletions, joins, bot posts and the like arrive as subtypes: never answered.
        if event.get("subtype") or not _from_a_person(event, context):
            return
        if event.get("channel_type") == "im":
            conversation = self._conversation(event, context, event.get("thread_ts", ""))
            await self._submit(conversation, event, context)
            return
        thread = event.get("thread_ts")
        if not thread or f"<@{context.bot_user_id}>" in event.get("text", ""):
            return  # not in a thread, or a mention: `app_mention` handles that one
        conversation = self._conversation(event, context, thread)
        if await self.redis.exists(self.keys.joined(conversation)):
            await self._submit(conversation, event, context)

    def _conversation(
        self, event: dict[str, Any], context: AsyncBoltContext, thread: str
    ) -> ConversationKey:
        team = context.team_id or event.get("team") or "unknown-team"
        return ConversationKey(PLATFORM, team, event["channel"], thread)

    async def _submit(
        self, conversation: ConversationKey, event: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        user = event["user"]
        text = _MENTION.sub(
            lambda m: "" if m.group(1) == context.bot_user_id else m.group(0),
            event.get("text", ""),
        )
        submission = await submit_user_message(
            self.store,
            self.queue,
            conversation,
            text=text,
            author_id=user,
            author_name=await self._display_name(conversation.workspace, user),
            message_id=event["ts"],
            dedupe_id=f"ts:{event['ts']}",
            max_chars=self.settings.max_message_chars,
            direct=event.get("channel_type") == "im",
        )
        if submission.outcome is Outcome.REJECTED:
            await self._say(conversation, submission.reply_text)
        elif submission.outcome is Outcome.QUEUED:
            await self._show_working(conversation)

    async def _display_name(self, team: str, user: str) -> str:
        key = self.keys.display_name(PLATFORM, team, user)
        cached = await self.redis.get(key)
        if cached:
            return str(cached)
        name = user
        try:
            response = await self.client.users_info(user=user)
            profile = response["user"].get("profile", {})
            name = (
                profile.get("display_name")
                or profile.get("real_name")
                or response["user"].get("name")
                or user
            )
        except (SlackApiError, ClientError, KeyError) as exc:
            log.warning("could not look up Slack user %s: %s", user, exc)
        await self.redis.set(key, name, ex=DISPLAY_NAME_TTL_S)
        return str(name)

    async def _show_working(self, conversation: ConversationKey) -> None:
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

    async def _say(self, conversation: ConversationKey, text: str) -> None:
        try:
            await self.client.chat_postMessage(
                channel=conversation.channel, thread_ts=conversation.thread or None, text=text
            )
        except (SlackApiError, ClientError) as exc:
            log.warning("could not answer in %s: %s", conversation.id, exc)

    # -- commands -----------------------------------------------------------------------

    async def _on_ask(
        self, ack: Any, respond: Any, command: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        question = (command.get("text") or "").strip()
        if not question:
            await ack(ASK_USAGE)
            return
        await ack()
        channel, user = command["channel_id"], command["user_id"]
        try:
            root = await self.client.chat_postMessage(
                channel=channel, text=f"<@{user}> asked: {question}"
            )
        except SlackApiError as exc:
            log.warning("/ask in %s: could not start a thread: %s", channel, exc)
            await respond(text=NOT_IN_CHANNEL, response_type="ephemeral")
            return
        team = context.team_id or command.get("team_id") or "unknown-team"
        conversation = ConversationKey(PLATFORM, team, channel, str(root["ts"]))
        await self.redis.set(self.keys.joined(conversation), "1", ex=self.settings.history_ttl_s)
        event = {"user": user, "text": question, "ts": str(root["ts"])}
        await self._submit(conversation, event, context)

    async def _on_reset(self, ack: Any, command: dict[str, Any], context: AsyncBoltContext) -> None:
        team = context.team_id or command.get("team_id") or "unknown-team"
        await self.store.clear(ConversationKey(PLATFORM, team, command["channel_id"], ""))
        await ack(RESET_DONE)

    # -- buttons ------------------------------------------------------------------------

    async def _on_feedback(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        action = body["actions"][0]
        user, channel = body["user"]["id"], body["channel"]["id"]
        recorded = await self.feedback.rate(
            action["value"], user, helpful=action["action_id"] == "feedback_up"
        )
        await self._ephemeral(channel, user, FEEDBACK_THANKS if recorded else FEEDBACK_EXPIRED)

    async def _on_handoff_request(
        self, ack: Any, body: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """The "Talk to a person" button: as if the customer had asked in words, so the
        request takes the same path (and the same history) as a typed one."""
        await ack()
        conversation = ConversationKey.from_id(body["actions"][0]["value"])
        event = {
            "user": body["user"]["id"],
            "text": HANDOFF_REQUEST_TEXT,
            "ts": str(body["actions"][0].get("action_ts") or body["trigger_id"]),
            "channel_type": "im" if conversation.channel.startswith("D") else "",
        }
        await self._submit(conversation, event, context)

    async def _on_handoff_release(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        conversation = ConversationKey.from_id(body["actions"][0]["value"])
        user = body["user"]["id"]
        released = await release_and_announce(self.handoffs, self.queue, conversation, user)
        if not released:
            await self._ephemeral(body["channel"]["id"], user, RELEASE_NOT_ACTIVE)

    async def _ephemeral(self, channel: str, user: str, text: str) -> None:
        try:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
        except (SlackApiError, ClientError) as exc:
            log.warning("could not answer %s in %s: %s", user, channel, exc)

    async def _on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error(
            "Slack event %s failed: %s",
            body.get("event_id") or body.get("command") or body.get("type"),
            error,
            exc_info=error,
        )

    # -- outbound -----------------------------------------------------------------------

    async def _post_reply(self, reply: Reply, parts: PostedParts) -> None:
        if reply.kind == "support":
            await self._post_support_alert(reply, parts)
            return
        conversation = reply.conversation
        chunks = split_message(markdown_to_mrkdwn(reply.text), MESSAGE_LIMIT)
        for index, chunk in enumerate(chunks):
            if index in parts.done:
                continue  # posted before a crash or a retry
            # Buttons go under the last part.
            blocks = _blocks(chunk, reply) if index == len(chunks) - 1 else None
            try:
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
        text = f"{_mention(str(reply.meta.get('mention', '')))}:rotating_light: {reply.text}"
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

    # -- running ------------------------------------------------------------------------

    async def check_credentials(self) -> str:
        """auth.test, so that a wrong token stops start-up with a clear message."""
        try:
            response = await self.client.auth_test()
        except SlackApiError as exc:
            raise SettingsError(
                f"SLACK_BOT_TOKEN was refused by Slack ({exc.response.get('error')}): "
                "copy the Bot User OAuth Token (xoxb-…) from the app's OAuth & Permissions page"
            ) from exc
        except ClientError as exc:
            raise SettingsError(
                f"cannot reach Slack at {self.settings.slack_api_url}: {exc}"
            ) from exc
        return f"{response.get('user')} in {response.get('team')}"

    async def serve(self, stop: asyncio.Event, port: int = 3000) -> None:
        """Events over HTTP (or Socket Mode with SLACK_APP_TOKEN) plus the outbox, until
        `stop`."""
        who = await self.check_credentials()
        await self.outbox.ensure_group()  # before any event can lead to a reply
        outbox = asyncio.create_task(self.outbox.run())
        try:
            if self.settings.slack_app_token:
                await self._serve_socket_mode(stop, who)
            else:
                await self._serve_http(stop, port, who)
        finally:
            self.outbox.stop()
            await outbox

    async def _serve_http(self, stop: asyncio.Event, port: int, who: str) -> None:
        app = self.app.web_app(path="/slack/events", port=port)
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", port)
        await site.start()
        log.info("Slack adapter (%s) listening on :%d/slack/events", who, port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    async def _serve_socket_mode(self, stop: asyncio.Event, who: str) -> None:
        from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

        handler: Any = AsyncSocketModeHandler(self.app, self.settings.slack_app_token)
        await handler.connect_async()
        log.info("Slack adapter (%s) connected in Socket Mode", who)
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await handler.close_async()


def _blocks(text: str, reply: Reply) -> list[dict[str, Any]] | None:
    """A section with the text and, when the reply asks for them, its buttons."""
    value = {
        "feedback": reply.reply_id,
        "handoff": reply.conversation.id,
        "release": reply.conversation.id,
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


def _from_a_person(event: dict[str, Any], context: AsyncBoltContext) -> bool:
    user = event.get("user")
    return bool(user) and not event.get("bot_id") and user != context.bot_user_id


async def _ignore() -> None:
    pass


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
