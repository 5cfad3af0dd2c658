"""The Discord adapter's interactions: slash commands, button clicks and reactions.

- /ask posts the question as a message and answers it like a mention; /reset forgets the
  conversation of a DM or thread; /release hands it back to the bot.
- "Talk to a person" / "Hand back to the bot" buttons hand the conversation to a person
  and back; 👍/👎 reactions on an answer rate it.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

import discord
from discord import app_commands

from bot.discord.posting import FEEDBACK_EMOJI, PLATFORM
from bot.discord.team import is_agent
from core.conversation import ConversationKey, Role
from core.inbound import Submission
from core.jobs import Outbox
from core.keys import Keys
from core.redis_conn import Redis
from core.store import ConversationStore
from core.support.agents import ONLY_AGENTS
from core.support.feedback import Feedback
from core.support.handoff import Handoffs, release_and_announce
from core.support.workspaces import Workspaces

log = logging.getLogger(__name__)

RESET_DONE = "Done: I've forgotten our conversation here."
RESET_IN_CHANNEL = (
    "In a channel every mention starts a new conversation, so there is nothing to reset. "
    "/reset works in DMs and threads."
)
HANDOFF_REQUEST_TEXT = "talk to a person"
CONFIRM_TEXT = "yes"
RELEASE_DONE = "Done: the bot answers in this conversation again."
RELEASE_NOT_ACTIVE = "This conversation is already back with the bot."
RELEASE_WHERE = (
    "/release works in the DM or thread of a conversation handed to a person; for a "
    "conversation in a channel, use the button on the handoff message."
)
_SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")


class Submit(Protocol):
    """`DiscordAdapter.submit`: store and enqueue a user's message, show typing."""

    async def __call__(
        self,
        conversation: ConversationKey,
        channel: Any,
        author: discord.User | discord.Member,
        text: str,
        message_id: str,
        *,
        direct: bool,
        dedupe_id: str | None = None,
    ) -> Submission: ...


class DiscordCommands:
    def __init__(
        self,
        client: discord.Client,
        *,
        redis: Redis,
        keys: Keys,
        store: ConversationStore,
        outbox: Outbox,
        workspaces: Workspaces,
        feedback: Feedback,
        handoffs: Handoffs,
        submit: Submit,
    ) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys
        self.store = store
        self.outbox = outbox
        self.workspaces = workspaces
        self.feedback = feedback
        self.handoffs = handoffs
        self.submit = submit

    def register(self, tree: app_commands.CommandTree[Any]) -> None:
        """Adds /ask, /reset and /release to the command tree."""
        tree.command(name="ask", description="Ask the support assistant a question")(self._on_ask)
        tree.command(name="reset", description="Forget our conversation here")(self._on_reset)
        tree.command(name="release", description="Hand this conversation back to the bot")(
            self._on_release
        )

    # -- slash commands -----------------------------------------------------------------

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
        submission = await self.submit(
            conversation,
            root.channel,
            interaction.user,
            question,
            str(root.id),
            direct=guild == "dm",
        )
        if submission.reply_text:  # rejected, rate-limited or busy: say so at once
            await interaction.followup.send(submission.reply_text)

    async def _on_reset(self, interaction: discord.Interaction) -> None:
        conversation = _command_conversation(interaction)
        if conversation is None:
            await interaction.response.send_message(RESET_IN_CHANNEL, ephemeral=True)
            return
        if not await self._may_reset(interaction, conversation):
            await interaction.response.send_message(ONLY_AGENTS, ephemeral=True)
            return
        await self.store.reset(conversation)
        await interaction.response.send_message(RESET_DONE, ephemeral=True)

    async def _may_reset(self, interaction: discord.Interaction, conversation: Any) -> bool:
        """A DM, a thread whose only customer is the user, or the support team."""
        if conversation.workspace == "dm":
            return True
        user = str(interaction.user.id)
        history = await self.store.history(conversation)
        authors = {m.author_id for m in history if m.role is Role.USER}
        return authors <= {user} or await self._is_agent(interaction)

    async def _is_agent(self, interaction: discord.Interaction) -> bool:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        return await is_agent(self.workspaces, self.client, interaction.user, guild)

    async def _on_release(self, interaction: discord.Interaction) -> None:
        """Hands the conversation of this DM or thread back to the bot."""
        conversation = _command_conversation(interaction)
        if conversation is None:
            await interaction.response.send_message(RELEASE_WHERE, ephemeral=True)
            return
        if not await self._is_agent(interaction):
            await interaction.response.send_message(ONLY_AGENTS, ephemeral=True)
            return
        released = await release_and_announce(
            self.handoffs, self.outbox, conversation, str(interaction.user.id)
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
        if action not in ("handoff_request", "handoff_release", "forget_confirm"):
            return
        try:
            conversation = ConversationKey.from_id(conversation_id)
        except ValueError:
            return
        if conversation.platform != PLATFORM:
            return
        if action == "handoff_release":
            if not await self._is_agent(interaction):
                await interaction.response.send_message(ONLY_AGENTS, ephemeral=True)
                return
            released = await release_and_announce(
                self.handoffs, self.outbox, conversation, str(interaction.user.id)
            )
            if released:
                await interaction.response.defer()
            else:
                await interaction.response.send_message(RELEASE_NOT_ACTIVE, ephemeral=True)
            return
        # "Talk to a person", "Yes, delete my data": as if the user had said so in words,
        # so the request takes the same path (and the same history) as a typed one.
        await interaction.response.defer()
        clicked = interaction.message
        await self.submit(
            conversation,
            self.client.get_partial_messageable(int(conversation.channel)),
            interaction.user,
            HANDOFF_REQUEST_TEXT if action == "handoff_request" else CONFIRM_TEXT,
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


def _command_conversation(interaction: discord.Interaction) -> ConversationKey | None:
    """The conversation a slash command was used in: a DM or a thread (None elsewhere)."""
    if interaction.guild_id is None:
        return ConversationKey(PLATFORM, "dm", str(interaction.channel_id))
    if isinstance(interaction.channel, discord.Thread):
        return ConversationKey(PLATFORM, str(interaction.guild_id), str(interaction.channel.id))
    return None
