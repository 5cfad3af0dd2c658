"""The Discord adapter, on discord.py 2.x: gateway events in, replies out, nothing else.

- Triggers: a mention of the bot (not @everyone or a role); a reply to one of the bot's
  messages; DMs; messages in a thread the bot was mentioned in. Bots (itself included) are
  never answered.
- Conversation: in a channel, the reply chain started by a mention (guild + channel + the
  chain's first message); a thread, a DM: the whole thread or DM.
- Replies: as a reply to the triggering message, typing shown while the workers generate,
  split below 2,000 characters (never inside a code block), and unable to ping @everyone or
  roles. discord.py waits out rate limits; a resumed gateway session that replays a message
  is deduplicated by message id, so it is never answered twice.
- Customer service: a handoff alert goes to the workspace's support channel (pinging the
  support role, with a link to the conversation); answers get 👍/👎 reactions that rate
  them; "Talk to a person" / "Hand back to the bot" buttons and /release hand the
  conversation to a person and back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from bot.chunking import split_message
from bot.outbox import OutboxConsumer, PermanentPostError, PostedParts
from core.conversation import ConversationKey, Reply
from core.errors import SettingsError
from core.support.feedback import Feedback
from core.support.handoff import Handoffs, release_and_announce
from core.inbound import Outcome, Submission, submit_user_message
from core.jobs import JobQueue
from core.keys import POSTED_TTL_S, Keys
from core.redis_conn import Redis
from core.settings import Settings
from core.store import ConversationStore

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
TYPING_TIMEOUT_S = 180.0
CHAIN_WAIT_TRIES = 30  # x 0.1 s
# View Channels, Send Messages, Send Messages in Threads, Read Message History.
INVITE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 38) | (1 << 16)
INTENT_HELP = (
    "Discord refused the Message Content intent (close code 4014). Turn it on: "
    "https://discord.com/developers/applications → your application → Bot → Privileged "
    "Gateway Intents → MESSAGE CONTENT INTENT, save, then start again."
)
RESET_DONE = "Done: I've forgotten our conversation here."
RESET_IN_CHANNEL = (
    "In a channel every mention starts a new conversation, so there is nothing to reset. "
    "/reset works in DMs and threads."
)
# The bot's words never ping anyone but the person it replies to.
REPLY_MENTIONS = discord.AllowedMentions(
    everyone=False, roles=False, users=False, replied_user=True
)
HANDOFF_REQUEST_TEXT = "talk to a person"
RELEASE_DONE = "Done: the bot answers in this conversation again."
RELEASE_NOT_ACTIVE = "This conversation is already back with the bot."
RELEASE_WHERE = (
    "/release works in the DM or thread of a conversation handed to a person; for a "
    "conversation in a channel, use the button on the handoff message."
)
# Reactions that rate an answer: emoji -> helpful
FEEDBACK_EMOJI = {"👍": True, "👎": False}
_SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")
# Buttons each reply action shows: action -> (custom_id prefix, label, style)
BUTTONS: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    "handoff": ("handoff_request", "Talk to a person", discord.ButtonStyle.primary),
    "release": ("handoff_release", "Hand back to the bot", discord.ButtonStyle.secondary),
}
CUSTOM_ID_LIMIT = 100


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
        intents = discord.Intents.default()
        intents.message_content = True
        self.client = _Client(self, intents=intents, allowed_mentions=REPLY_MENTIONS)
        self.tree = app_commands.CommandTree(self.client)
        self.tree.command(name="ask", description="Ask the support assistant a question")(
            self._on_ask
        )
        self.tree.command(name="reset", description="Forget our conversation here")(self._on_reset)
        self.tree.command(name="release", description="Hand this conversation back to the bot")(
            self._on_release
        )
        self.feedback = Feedback(redis, self.keys, settings.history_ttl_s)
        self.handoffs = Handoffs(redis, self.keys, settings.history_ttl_s)
        self.outbox = OutboxConsumer(
            redis, self.keys, PLATFORM, self._post_reply, reclaim_idle_s=settings.reclaim_idle_s
        )
        self._typing: set[asyncio.Task[None]] = set()

    # -- inbound ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.author.bot:
            return
        conversation = await self._conversation_for(message, me)
        if conversation is None:
            return
        text = re.sub(rf"<@!?{me.id}>", "", message.content)
        submission = await self._submit(
            conversation,
            message.channel,
            message.author,
            text,
            str(message.id),
            direct=message.guild is None,
        )
        if submission.outcome is Outcome.REJECTED:
            await message.reply(submission.reply_text, allowed_mentions=REPLY_MENTIONS)

    async def _submit(
        self,
        conversation: ConversationKey,
        channel: Any,
        author: discord.User | discord.Member,
        text: str,
        message_id: str,
        *,
        direct: bool,
        dedupe_id: str | None = None,
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
            direct=direct,
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
                    await asyncio.sleep(0.5)
        except (discord.HTTPException, OSError) as exc:
            log.debug("typing indicator in %s stopped: %s", conversation.id, exc)

    # -- commands -----------------------------------------------------------------------

    async def _on_ask(self, interaction: discord.Interaction, question: str) -> None:
        """Posts the question as a message; the answer comes as a reply to it."""
        await interaction.response.send_message(
            f"**{interaction.user.display_name} asked:** {question}",
            allowed_mentions=discord.AllowedMentions.none(),
        )
        root = await interaction.original_response()
        guild = str(interaction.guild_id) if interaction.guild_id else "dm"
        thread = "" if guild == "dm" else str(root.id)
        conversation = ConversationKey(PLATFORM, guild, str(interaction.channel_id), thread)
        submission = await self._submit(
            conversation,
            root.channel,
            interaction.user,
            question,
            str(root.id),
            direct=guild == "dm",
        )
        if submission.outcome is Outcome.REJECTED:
            await interaction.followup.send(submission.reply_text)

    async def _on_reset(self, interaction: discord.Interaction) -> None:
        conversation = _command_conversation(interaction)
        if conversation is None:
            await interaction.response.send_message(RESET_IN_CHANNEL, ephemeral=True)
            return
        await self.store.clear(conversation)
        await interaction.response.send_message(RESET_DONE, ephemeral=True)

    async def _on_release(self, interaction: discord.Interaction) -> None:
        """Hands the conversation of this DM or thread back to the bot."""
        conversation = _command_conversation(interaction)
        if conversation is None:
            await interaction.response.send_message(RELEASE_WHERE, ephemeral=True)
            return
        released = await release_and_announce(
            self.handoffs, self.queue, conversation, str(interaction.user.id)
        )
        await interaction.response.send_message(
            RELEASE_DONE if released else RELEASE_NOT_ACTIVE, ephemeral=True
        )

    # -- buttons and reactions ----------------------------------------------------------

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Clicks on the handoff buttons (slash commands go to the command tree)."""
        if interaction.type is not discord.InteractionType.component:
            return
        data: Any = interaction.data or {}
        action, _, conversation_id = str(data.get("custom_id", "")).partition(":")
        if action not in ("handoff_request", "handoff_release"):
            return
        try:
            conversation = ConversationKey.from_id(conversation_id)
        except ValueError:
            return
        if conversation.platform != PLATFORM:
            return
        if action == "handoff_release":
            released = await release_and_announce(
                self.handoffs, self.queue, conversation, str(interaction.user.id)
            )
            if released:
                await interaction.response.defer()
            else:
                await interaction.response.send_message(RELEASE_NOT_ACTIVE, ephemeral=True)
            return
        # "Talk to a person": as if the customer had asked in words, so the request takes
        # the same path (and the same history) as a typed one.
        await interaction.response.defer()
        clicked = interaction.message
        await self._submit(
            conversation,
            self.client.get_partial_messageable(int(conversation.channel)),
            interaction.user,
            HANDOFF_REQUEST_TEXT,
            str(clicked.id if clicked is not None else interaction.id),
            direct=conversation.workspace == "dm",
            dedupe_id=f"interaction:{interaction.id}",
        )

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """👍/👎 on an answer rates it."""
        me = self.client.user
        if me is None or payload.user_id == me.id or payload.emoji.id is not None:
            return
        helpful = FEEDBACK_EMOJI.get(_SKIN_TONES.sub("", payload.emoji.name or ""))
        if helpful is None:
            return
        user = payload.member or self.client.get_user(payload.user_id)
        if user is not None and user.bot:
            return
        key = self.keys.reply_of_message(PLATFORM, str(payload.channel_id), str(payload.message_id))
        reply_id = await self.redis.get(key)
        if not reply_id:
            return
        if not await self.feedback.rate(str(reply_id), str(payload.user_id), helpful=helpful):
            log.debug("rating of %s ignored: the answer has expired", reply_id)

    # -- outbound -----------------------------------------------------------------------

    async def _post_reply(self, reply: Reply, parts: PostedParts) -> None:
        if reply.kind == "support":
            await self._post_support_alert(reply, parts)
            return
        conversation = reply.conversation
        channel = self.client.get_partial_messageable(int(conversation.channel))
        reference = None
        if reply.reply_to:  # a notice (the bot is back…) answers no message
            reference = discord.MessageReference(
                message_id=int(reply.reply_to),
                channel_id=int(conversation.channel),
                fail_if_not_exists=False,
            )
        chunks = split_message(reply.text, MESSAGE_LIMIT)
        last = len(chunks) - 1
        rated = "feedback" in reply.actions
        for index, chunk in enumerate(chunks):
            if index in parts.done:
                continue  # posted before a crash or a retry
            view = _buttons(reply) if index == last else None  # under the last part
            try:
                sent = await channel.send(
                    chunk,
                    reference=reference if index == 0 else None,  # type: ignore[arg-type]
                    allowed_mentions=REPLY_MENTIONS,
                    view=view,  # type: ignore[arg-type]
                )
            except (discord.Forbidden, discord.NotFound) as exc:
                raise PermanentPostError(f"Discord refused it: {exc}") from exc
            if index == last and rated:  # before the reactions, so that none is missed
                await self.redis.set(
                    self.keys.reply_of_message(PLATFORM, conversation.channel, str(sent.id)),
                    reply.reply_id,
                    ex=POSTED_TTL_S,
                )
            await parts.record(index, str(sent.id))
            if index == last and rated:
                await _add_reactions(sent, list(FEEDBACK_EMOJI))
            if conversation.thread:  # a reply to this message continues the conversation
                await self.redis.set(
                    self.keys.reply_chain(PLATFORM, conversation.channel, str(sent.id)),
                    conversation.thread,
                    ex=self.settings.history_ttl_s,
                )

    async def _post_support_alert(self, reply: Reply, parts: PostedParts) -> None:
        """The handoff alert in the support channel: who to ping, who asked, a link."""
        if 0 in parts.done:
            return
        conversation = reply.conversation
        target = str(reply.meta.get("target_channel", ""))
        if not target.isdigit():
            raise PermanentPostError(f"the support channel {target!r} is not a Discord id")
        mention, allowed = self._support_mention(target, str(reply.meta.get("mention", "")))
        link = jump_link(conversation, reply.reply_to)
        text = f"{mention}🚨 {reply.text} Open the conversation: {link}"
        release = Reply(reply.reply_id, conversation, text, "", 0, meta={"actions": ["release"]})
        channel = self.client.get_partial_messageable(int(target))
        try:
            sent = await channel.send(
                text,
                allowed_mentions=allowed,
                view=_buttons(release),  # type: ignore[arg-type]
            )
        except (discord.Forbidden, discord.NotFound) as exc:
            raise PermanentPostError(
                f"Discord refused the handoff alert in {target}: {exc} (let the bot see and "
                "post in the support channel)"
            ) from exc
        await parts.record(0, str(sent.id))

    def _support_mention(self, target: str, mention: str) -> tuple[str, discord.AllowedMentions]:
        """The text that pings the support role (or user), and the only ping allowed."""
        nobody = discord.AllowedMentions.none()
        mention_id = re.sub(r"\D", "", mention)
        if not mention_id:
            return "", nobody
        # A role of the support channel's guild, else a user; "<@&id>"/"<@id>" say which.
        is_role = not mention.startswith("<@") or mention.startswith("<@&")
        if not mention.startswith("<@"):
            guild = getattr(self.client.get_channel(int(target)), "guild", None)
            is_role = guild is None or guild.get_role(int(mention_id)) is not None
        who = discord.Object(int(mention_id))
        if is_role:
            allowed = discord.AllowedMentions(
                everyone=False, users=False, roles=[who], replied_user=False
            )
            return f"<@&{mention_id}> ", allowed
        return f"<@{mention_id}> ", discord.AllowedMentions(
            everyone=False, roles=False, users=[who], replied_user=False
        )

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

    async def on_ready(self) -> None:
        log.info("Discord adapter connected as %s", self.user)

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        await self.adapter.on_interaction(interaction)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_raw_reaction_add(payload)


def jump_link(conversation: ConversationKey, reply_to: str) -> str:
    """Discord's link to the conversation: its root message (a reply chain) or the message
    answered (a thread, whose id is the channel; a DM)."""
    guild = "@me" if conversation.workspace == "dm" else conversation.workspace
    link = f"https://discord.com/channels/{guild}/{conversation.channel}"
    message = conversation.thread or reply_to
    return f"{link}/{message}" if message else link


def _command_conversation(interaction: discord.Interaction) -> ConversationKey | None:
    """The conversation a slash command was used in: a DM or a thread (None elsewhere)."""
    if interaction.guild_id is None:
        return ConversationKey(PLATFORM, "dm", str(interaction.channel_id))
    if isinstance(interaction.channel, discord.Thread):
        return ConversationKey(PLATFORM, str(interaction.guild_id), str(interaction.channel.id))
    return None


def _buttons(reply: Reply) -> discord.ui.View | None:
    """The buttons a reply's actions ask for; discord.py does not track them (the clicks
    arrive in `on_interaction`, also after a restart)."""
    buttons: list[discord.ui.Button[discord.ui.View]] = []
    for action in reply.actions:
        if action not in BUTTONS:
            continue
        prefix, label, style = BUTTONS[action]
        custom_id = f"{prefix}:{reply.conversation.id}"
        if len(custom_id) > CUSTOM_ID_LIMIT:
            log.warning("no %s button in %s: its id is too long", action, reply.conversation.id)
            continue
        buttons.append(discord.ui.Button(label=label, style=style, custom_id=custom_id))
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(button)
    view.stop()  # a stopped view is sent but not stored in discord.py's view store
    return view


async def _add_reactions(message: discord.Message, emoji: list[str]) -> None:
    try:
        for each in emoji:
            await message.add_reaction(each)
    except discord.HTTPException as exc:
        log.warning("could not add the rating reactions to %s: %s", message.id, exc)
