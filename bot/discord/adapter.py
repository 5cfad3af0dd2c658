"""The Discord adapter, on discord.py 2.x: gateway events in, replies out, nothing else.

- Triggers: a mention of the bot (not @everyone or a role); a reply to one of the bot's
  messages; DMs; messages in a thread the bot was mentioned in. Bots (itself included) are
  never answered.
- Conversation: in a channel, the reply chain started by a mention (guild + channel + the
  chain's first message); a thread, a DM: the whole thread or DM.
- Typing is shown while the workers generate; a resumed gateway session that replays a
  message is deduplicated by message id, so it is never answered twice.
- Replies and handoff alerts go out through `bot.discord.posting`; slash commands, buttons
  and reactions are handled in `bot.discord.commands`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from bot.discord.catch_up import ChannelMarks, catch_up
from bot.discord.commands import DiscordCommands
from bot.discord.metrics import count_calls, http_trace
from bot.discord.posting import PLATFORM, REPLY_MENTIONS, DiscordPoster
from bot.discord.team import is_agent
from bot.outbox import OutboxConsumer
from core.context import handling
from core.conversation import ConversationKey
from core.errors import SettingsError
from core.inbound import Outcome, Submission, submit_user_message
from core.jobs import JobQueue, Outbox
from core.keys import Keys
from core.redis_conn import TRANSIENT_ERRORS, Backoff, Redis
from core.settings import Settings
from core.store import ConversationStore
from core.support.feedback import Feedback
from core.support.handoff import Handoffs
from core.support.workspaces import Workspaces

log = logging.getLogger(__name__)

TYPING_TIMEOUT_S = 180.0
CHAIN_WAIT_TRIES = 30  # x 0.1 s
# While Redis is unreachable, messages wait in memory: at most this many, this long each.
SPOOL_LIMIT = 500
SPOOL_PATIENCE_S = 300.0
TRY_AGAIN_LATER = (
    "Sorry, I'm having trouble on my side and couldn't take your message. "
    "Please send it again in a few minutes."
)
# View Channels, Send Messages, Send Messages in Threads, Read Message History.
INVITE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 38) | (1 << 16)
INTENT_HELP = (
    "Discord refused the Message Content intent (close code 4014). Turn it on: "
    "https://discord.com/developers/applications → your application → Bot → Privileged "
    "Gateway Intents → MESSAGE CONTENT INTENT, save, then start again."
)


def application_id_from_token(token: str) -> str:
    """A bot token starts with the base64 of the bot's user id (= its application id)."""
    head = token.split(".", 1)[0]
    try:
        return base64.b64decode(head + "=" * (-len(head) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise SettingsError("DISCORD_TOKEN does not look like a bot token") from None


def invite_url(token: str) -> str:
    app_id = application_id_from_token(token)
    return (
        "https://discord.com/oauth2/authorize"
        f"?client_id={app_id}&scope=bot+applications.commands&permissions={INVITE_PERMISSIONS}"
    )


class DiscordAdapter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        if not settings.discord_token:
            raise SettingsError("DISCORD_TOKEN is not set")
        # discord.py reads these class attributes; DISCORD_API_URL / DISCORD_GATEWAY_URL let
        # an operator use a proxy and the tests a local emulator.
        discord.http.Route.BASE = settings.discord_api_url.rstrip("/")
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.store = ConversationStore.from_settings(redis, settings)
        self.queue = JobQueue(redis, self.keys)
        self.marks = ChannelMarks(redis, self.keys)
        intents = discord.Intents.default()
        intents.message_content = True
        self.client = _Client(
            self, intents=intents, allowed_mentions=REPLY_MENTIONS, http_trace=http_trace()
        )
        count_calls(self.client.http)  # failed and retried REST calls, in the metrics
        self.tree = app_commands.CommandTree(self.client)
        self.poster = DiscordPoster(self.client, redis, self.keys, settings.history_ttl_s)
        self.feedback = Feedback(redis, self.keys, settings.history_ttl_s)
        self.workspaces = Workspaces(redis, self.keys, settings)
        self.handoffs = Handoffs(redis, self.keys, settings.history_ttl_s)
        self.commands = DiscordCommands(
            self.client,
            redis=redis,
            keys=self.keys,
            store=self.store,
            outbox=Outbox(redis, self.keys),
            workspaces=self.workspaces,
            feedback=self.feedback,
            handoffs=self.handoffs,
            submit=self.submit,
        )
        self.commands.register(self.tree)
        self.outbox = OutboxConsumer(
            redis,
            self.keys,
            PLATFORM,
            self.poster.post_reply,
            reclaim_idle_s=settings.reclaim_idle_s,
            show_partial=self.poster.show_partial if settings.streaming else None,
        )
        self._typing: set[asyncio.Task[None]] = set()
        self._spooled = 0  # messages waiting for Redis

    # -- inbound ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Discord never delivers a message twice, so one that arrives while Redis is away
        waits here (a bounded spool: `SPOOL_LIMIT` messages, `SPOOL_PATIENCE_S` each) and
        is stored when Redis is back; dedupe makes the retries safe."""
        me = self.client.user
        if me is None or message.author.bot:
            return
        if self._spooled >= SPOOL_LIMIT:
            log.error(
                "Redis unreachable and %d Discord messages waiting: message %s in %s not "
                "stored; its author was asked to send it again",
                self._spooled,
                message.id,
                message.channel.id,
            )
            await self._reply_quietly(message, TRY_AGAIN_LATER)
            return
        self._spooled += 1
        try:
            await self._store_when_possible(message, me)
        finally:
            self._spooled -= 1

    async def _store_when_possible(self, message: discord.Message, me: discord.ClientUser) -> None:
        give_up_at = time.monotonic() + SPOOL_PATIENCE_S
        received_at = time.time()  # the reply's timings start here, however long Redis is away
        backoff = Backoff(f"storing Discord message {message.id}")
        while True:
            try:
                await self._on_message(message, me, give_up_at, received_at)
                backoff.succeeded()
                return
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() > give_up_at:
                    log.error(
                        "Discord message %s in %s not stored: Redis unreachable for %.0f s "
                        "(%s); its author was asked to send it again",
                        message.id,
                        message.channel.id,
                        SPOOL_PATIENCE_S,
                        exc,
                    )
                    await self._reply_quietly(message, TRY_AGAIN_LATER)
                    return
                await backoff.failed(exc)

    async def _reply_quietly(self, message: discord.Message, text: str) -> None:
        with contextlib.suppress(discord.HTTPException):
            await message.reply(text, allowed_mentions=REPLY_MENTIONS)

    async def _on_message(
        self,
        message: discord.Message,
        me: discord.ClientUser,
        give_up_at: float,
        received_at: float,
    ) -> None:
        conversation = await self._conversation_for(message, me)
        if conversation is None:
            return
        text = re.sub(rf"<@!?{me.id}>", "", message.content)
        # Only the support team's words count as an agent's (and only during a handoff).
        guild = str(message.guild.id) if message.guild else None
        # In every log line about this message, and in the typing task it starts.
        with handling(conversation.id, received_at=received_at):
            submission = await self.submit(
                conversation,
                message.channel,
                message.author,
                text,
                str(message.id),
                direct=message.guild is None,
                is_agent=lambda: is_agent(self.workspaces, self.client, message.author, guild),
                give_up_after_s=max(give_up_at - time.monotonic(), 0.0),
                received_at=received_at,
            )
            await self.marks.record(str(message.channel.id), str(message.id))
            if submission.reply_text:  # rejected, rate-limited or busy: say so at once
                await message.reply(submission.reply_text, allowed_mentions=REPLY_MENTIONS)

    async def catch_up(self) -> None:
        """Answer what was written to the bot while no session was connected."""
        try:
            await catch_up(self.client, self.marks, self.on_message)
        except TRANSIENT_ERRORS as exc:  # the messages wait for the next new session
            log.warning("could not catch up with Discord messages (Redis unreachable: %s)", exc)

    async def submit(
        self,
        conversation: ConversationKey,
        channel: Any,
        author: discord.User | discord.Member,
        text: str,
        message_id: str,
        *,
        direct: bool,
        dedupe_id: str | None = None,
        give_up_after_s: float | None = None,
        is_agent: Callable[[], Awaitable[bool]] | None = None,
        received_at: float | None = None,
    ) -> Submission:
        """Store and enqueue a user's message; show typing until it is answered.

        `direct`: a DM, which the workspace's channel restrictions do not apply to."""
        submission = await submit_user_message(
            self.store,
            self.queue,
            conversation,
            text=text,
            author_id=str(author.id),
            author_name=author.display_name,
            message_id=message_id,
            max_chars=self.settings.max_message_chars,
            dedupe_id=dedupe_id,
            give_up_after_s=give_up_after_s,
            direct=direct,
            is_agent=is_agent,
            received_at=received_at,
        )
        if submission.outcome is Outcome.QUEUED:
            self._show_typing(channel, conversation, submission.seq)
        return submission

    async def _conversation_for(
        self, message: discord.Message, me: discord.ClientUser
    ) -> ConversationKey | None:
        channel = message.channel
        mentioned = me in message.mentions  # @everyone and roles are not in `mentions`
        if message.guild is None:
            return ConversationKey(PLATFORM, "dm", str(channel.id))
        guild = str(message.guild.id)
        if isinstance(channel, discord.Thread):
            conversation = ConversationKey(PLATFORM, guild, str(channel.id))
            joined = self.keys.joined(conversation)
            if mentioned or channel.owner_id == me.id:
                await self.redis.set(joined, "1", ex=self.settings.history_ttl_s)
                return conversation
            return conversation if await self.redis.exists(joined) else None
        reference = message.reference
        if reference is not None and reference.message_id is not None:
            root = await self._chain_root(message, str(reference.message_id), me)
            if root:  # a reply to one of the bot's messages continues that conversation
                return ConversationKey(PLATFORM, guild, str(channel.id), root)
        if mentioned:
            return ConversationKey(PLATFORM, guild, str(channel.id), str(message.id))
        return None

    async def _chain_root(
        self, message: discord.Message, replied_to: str, me: discord.ClientUser
    ) -> str | None:
        """The conversation of the bot message `replied_to`, if it is one of ours.

        The link is written just after the bot's message is sent; a reply that arrives in
        between (a fast client, a busy Redis) waits briefly for it rather than starting a
        new conversation.
        """
        key = self.keys.reply_chain(PLATFORM, str(message.channel.id), replied_to)
        resolved = message.reference.resolved if message.reference else None
        ours = isinstance(resolved, discord.Message) and resolved.author.id == me.id
        tries = CHAIN_WAIT_TRIES if ours else 1
        for attempt in range(tries):
            root = await self.redis.get(key)
            if root:
                return str(root)
            if attempt + 1 < tries:
                await asyncio.sleep(0.1)
        return None

    def _show_typing(self, channel: Any, conversation: ConversationKey, seq: int) -> None:
        task = asyncio.create_task(self._type_until_answered(channel, conversation, seq))
        self._typing.add(task)
        task.add_done_callback(self._typing.discard)

    async def _type_until_answered(
        self, channel: Any, conversation: ConversationKey, seq: int
    ) -> None:
        deadline = time.monotonic() + TYPING_TIMEOUT_S
        try:
            async with channel.typing():
                while time.monotonic() < deadline:
                    if (await self.store.state(conversation)).answered >= seq:
                        return
                    streams = self.outbox.streams
                    if streams is not None and streams.is_following(conversation.id):
                        return  # the first words are showing
                    await asyncio.sleep(0.5)
        except (discord.HTTPException, *TRANSIENT_ERRORS) as exc:
            log.debug("typing indicator in %s stopped: %s", conversation.id, exc)

    # -- running ------------------------------------------------------------------------

    async def sync_commands(self) -> None:
        try:
            await self.tree.sync()
        except discord.HTTPException as exc:
            log.warning("could not register the slash commands: %s", exc)

    async def serve(self, stop: asyncio.Event) -> None:
        """Gateway connection (reconnecting and resuming on its own) plus the outbox."""
        token = self.settings.discord_token or ""
        await self.outbox.ensure_group()  # before any message can lead to a reply
        outbox = asyncio.create_task(self.outbox.run())
        client = asyncio.create_task(self.client.start(token))
        stop_wait = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({client, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if client.done():
                client.result()  # raises what ended it
                raise SettingsError("the Discord connection closed unexpectedly")
        except discord.PrivilegedIntentsRequired:
            raise SettingsError(INTENT_HELP) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SettingsError(
                f"cannot reach Discord at {self.settings.discord_api_url}: {exc}"
            ) from exc
        except discord.LoginFailure:
            raise SettingsError(
                "DISCORD_TOKEN was refused by Discord: copy the token from the developer "
                "portal (your application → Bot → Reset Token)"
            ) from None
        finally:
            stop_wait.cancel()
            self.outbox.stop()
            for task in self._typing:
                task.cancel()
            with contextlib.suppress(Exception):
                await self.client.close()
            await asyncio.gather(outbox, client, *self._typing, return_exceptions=True)


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        await self.adapter.sync_commands()

    async def on_ready(self) -> None:  # a new session, not a resumed one
        log.info("Discord adapter connected as %s", self.user)
        await self.adapter.catch_up()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        await self.adapter.commands.on_interaction(interaction)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.commands.on_raw_reaction_add(payload)
