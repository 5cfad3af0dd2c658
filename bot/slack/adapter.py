"""The Slack adapter, on slack-bolt (async): events in, replies out, nothing else.

- A mention in a channel starts a conversation in a thread under that message; in a thread
  the bot has joined it answers follow-ups without a new mention; DMs are answered.
- Slack team + channel + thread root is the conversation (a top-level DM: the DM itself).
- Durable inbound: an event is acknowledged only once its message is in Redis (bolt's
  `process_before_response`); while Redis is unreachable the event is answered 500 (or not
  acknowledged over Socket Mode), so Slack delivers it again. Slack's retries and the
  double delivery of a mention (`app_mention` and `message`) are deduplicated in Redis by
  the message `ts`, so replicas post one reply. A malformed event is logged and
  acknowledged (redelivering it would not help). Commands and buttons are acknowledged at
  once and handled in the background. Generation happens in the workers.
- Replies, and all else the bot posts, go out through `bot.slack.posting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import ClientError, web
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError

from bot.outbox import OutboxConsumer
from bot.slack.commands import INBOUND_PATIENCE_S, SlackCommands
from bot.slack.posting import SlackPoster, web_client
from bot.slack.requests import reject_malformed
from core.context import handling
from core.conversation import ConversationKey
from core.errors import SettingsError
from core.inbound import Outcome, submit_user_message
from core.jobs import JobQueue, Outbox
from core.keys import DISPLAY_NAME_TTL_S, Keys
from core.redis_conn import Redis
from core.settings import Settings
from core.store import ConversationStore
from core.support.agents import SupportTeam
from core.support.feedback import Feedback
from core.support.handoff import Handoffs
from core.support.workspaces import Workspaces

log = logging.getLogger(__name__)

PLATFORM = "slack"
_MENTION = re.compile(r"<@([UW][A-Z0-9]+)>")
NAME_LOOKUP_TIMEOUT_S = 1.0  # the event is acknowledged only after the lookup


class SlackAdapter(SlackCommands):
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
        self.outbox_writer = Outbox(redis, self.keys)
        self.client = web_client(settings)
        self.poster = SlackPoster(self.client, redis, self.keys)
        self.app = AsyncApp(
            client=self.client,
            signing_secret=settings.slack_signing_secret or "",
            # Without this, bolt answers unhandled events with 404 and Slack retries them.
            raise_error_for_unhandled_request=False,
            process_before_response=True,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.command("/ask")(self._on_ask)
        self.app.command("/reset")(self._on_reset)
        self.app.action("feedback_up")(self._on_feedback)
        self.app.action("feedback_down")(self._on_feedback)
        self.app.action("handoff_request")(self._on_handoff_request)
        self.app.action("forget_confirm")(self._on_forget_confirm)
        self.app.action("handoff_release")(self._on_handoff_release)
        self.feedback = Feedback(redis, self.keys, settings.history_ttl_s)
        self.handoffs = Handoffs(redis, self.keys, settings.history_ttl_s)
        self.workspaces = Workspaces(redis, self.keys, settings)
        self.support_team = SupportTeam(redis, self.keys)
        # Everything else (reactions, channel events…) is acknowledged and ignored: an
        # unanswered event would be retried by Slack and count against the app.
        self.app.event(re.compile(".*"))(_ignore)
        self.app.error(self._on_error)
        self.outbox = OutboxConsumer(
            redis,
            self.keys,
            PLATFORM,
            self.poster.post_reply,
            reclaim_idle_s=settings.reclaim_idle_s,
            show_partial=self.poster.streams.show_partial if settings.streaming else None,
        )

    # -- inbound ------------------------------------------------------------------------

    async def _on_mention(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        if not _from_a_person(event, context) or not _well_formed(event):
            return
        root = event.get("thread_ts") or event["ts"]
        conversation = self._conversation(event, context, root)
        await self.redis.set(self.keys.joined(conversation), "1", ex=self.settings.history_ttl_s)
        await self._submit(conversation, event, context)

    async def _on_message(self, event: dict[str, Any], context: AsyncBoltContext) -> None:
        # Edits, deletions, joins, bot posts and the like arrive as subtypes: never answered.
        if event.get("subtype") or not _from_a_person(event, context):
            return
        if not _well_formed(event):
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
        self,
        conversation: ConversationKey,
        event: dict[str, Any],
        context: AsyncBoltContext,
        give_up_after_s: float | None = INBOUND_PATIENCE_S,
    ) -> None:
        """Store and enqueue a user's message. Redis errors after `give_up_after_s` are
        raised: for an event, bolt answers 500 and Slack delivers it again."""
        received_at = time.time()  # before the name lookup: the reply's timings start here
        # In every log line about this event, and in the tasks it starts.
        with handling(conversation.id, received_at=received_at):
            await self._take_in(conversation, event, context, give_up_after_s, received_at)

    async def _take_in(
        self,
        conversation: ConversationKey,
        event: dict[str, Any],
        context: AsyncBoltContext,
        give_up_after_s: float | None,
        received_at: float,
    ) -> None:
        user = event["user"]
        text = _MENTION.sub(
            lambda m: "" if m.group(1) == context.bot_user_id else m.group(0),
            event.get("text", ""),
        )
        # Only the support team's words count as an agent's (asked during a handoff only).
        submission = await submit_user_message(
            self.store,
            self.queue,
            conversation,
            is_agent=lambda: self._is_agent(conversation.workspace, user),
            text=text,
            author_id=user,
            author_name=await self._display_name(conversation.workspace, user),
            message_id=event["ts"],
            dedupe_id=f"ts:{event['ts']}",
            max_chars=self.settings.max_message_chars,
            give_up_after_s=give_up_after_s,
            direct=event.get("channel_type") == "im",
            received_at=received_at,
        )
        # Stored: the rest must not hold up the acknowledgement.
        if submission.reply_text:  # rejected, rate-limited or busy: say so at once
            self._later(self.poster.say(conversation, submission.reply_text))
        elif submission.outcome is Outcome.QUEUED:
            if self.settings.streaming:
                self._later(self.poster.show_thinking(conversation, event["ts"]))
            else:
                self._later(self.poster.show_working(conversation, event["ts"]))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` after the acknowledgement; failures are logged."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Slack background work failed", exc_info=task.exception())

    async def _is_agent(self, team: str, user: str) -> bool:
        return await self.support_team.includes(
            PLATFORM, team, user, lambda: self._support_team_of(team)
        )

    async def _support_team_of(self, team: str) -> set[str]:
        """The workspace's support user group (S…) or user (U…/W…), else the members of
        its support channel; nobody when neither is set."""
        config = await self.workspaces.config(PLATFORM, team)
        mention = config.support_mention
        if mention.startswith("S"):
            response = await self.client.usergroups_users_list(usergroup=mention)
            return {str(u) for u in response.get("users") or []}
        if mention[:1] in ("U", "W"):
            return {mention}
        if config.support_channel:
            response = await self.client.conversations_members(
                channel=config.support_channel, limit=1000
            )
            return {str(u) for u in response.get("members") or []}
        return set()

    async def _display_name(self, team: str, user: str) -> str:
        key = self.keys.display_name(PLATFORM, team, user)
        cached = await self.redis.get(key)
        if cached:
            return str(cached)
        name = user
        try:
            # Bounded: the event is acknowledged only after this.
            response = await asyncio.wait_for(
                self.client.users_info(user=user), NAME_LOOKUP_TIMEOUT_S
            )
            profile = response["user"].get("profile", {})
            name = (
                profile.get("display_name")
                or profile.get("real_name")
                or response["user"].get("name")
                or user
            )
        except (SlackApiError, ClientError, KeyError, TimeoutError) as exc:
            log.warning("could not look up Slack user %s: %r", user, exc)
        await self.redis.set(key, name, ex=DISPLAY_NAME_TTL_S)
        return str(name)

    async def _on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error(
            "Slack event %s failed: %s",
            body.get("event_id") or body.get("command") or body.get("type"),
            error,
            exc_info=error,
        )

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
            # Background work already acknowledged to Slack: let it finish.
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve_http(self, stop: asyncio.Event, port: int, who: str) -> None:
        app = self.app.web_app(path="/slack/events", port=port)
        app.middlewares.append(reject_malformed)
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


def _from_a_person(event: dict[str, Any], context: AsyncBoltContext) -> bool:
    user = event.get("user")
    return bool(user) and not event.get("bot_id") and user != context.bot_user_id


def _well_formed(event: dict[str, Any]) -> bool:
    """The fields a message event must have, of the right types (else logged: Slack would
    redeliver a failed one three times to no use)."""
    fields = {"user": str, "ts": str, "channel": str}
    wrong = [n for n, kind in fields.items() if not isinstance(event.get(n), kind) or not event[n]]
    if isinstance(event.get("text", ""), str) and not wrong:
        return True
    log.warning("malformed Slack message event (%s): ignored", ", ".join(wrong) or "text")
    return False


async def _ignore() -> None:
    pass


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
