"""The Discord adapter's outbound side: replies and handoff alerts.

- Replies: as a reply to the triggering message, split below 2,000 characters (never inside
  a code block), and unable to ping @everyone or roles; discord.py waits out rate limits.
- While a reply is generated it grows in place (`show_partial`, paced per channel by
  bot/streaming.py; a new message before 2,000 characters), and the committed reply edits
  those same messages into the final ones.
  Answers get 👍/👎 reactions that rate them, and a reply to one of the bot's messages
  continues its conversation.
- A handoff alert goes to the workspace's support channel, pinging the support role, with
  a link to the conversation and a "Hand back to the bot" button.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re

import discord

from bot.chunking import split_message
from bot.outbox import PermanentPostError, PostedParts
from bot.streaming import stream_part, streamed_messages
from core.conversation import ConversationKey, Reply
from core.keys import POSTED_TTL_S, Keys
from core.redis_conn import Redis

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
# The bot's words never ping anyone but the person it replies to.
REPLY_MENTIONS = discord.AllowedMentions(
    everyone=False, roles=False, users=False, replied_user=True
)
# Reactions that rate an answer: emoji -> helpful
FEEDBACK_EMOJI = {"👍": True, "👎": False}
# Buttons each reply action shows: action -> (custom_id prefix, label, style)
BUTTONS: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    "handoff": ("handoff_request", "Talk to a person", discord.ButtonStyle.primary),
    "release": ("handoff_release", "Hand back to the bot", discord.ButtonStyle.secondary),
    "forget": ("forget_confirm", "Yes, delete my data", discord.ButtonStyle.danger),
}
CUSTOM_ID_LIMIT = 100


class DiscordPoster:
    """Posts replies and handoff alerts (for the outbox)."""

    def __init__(
        self, client: discord.Client, redis: Redis, keys: Keys, history_ttl_s: int
    ) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys
        self.history_ttl_s = history_ttl_s
        # What each streamed message of a reply shows (this process's edits only).
        self._shown: dict[str, dict[int, str]] = {}

    async def show_partial(self, reply: Reply, text: str, parts: PostedParts) -> None:
        """Show a reply still being generated: its streamed messages edited to `text`
        (a new one when it outgrows the last)."""
        channel = self.client.get_partial_messageable(int(reply.conversation.channel))
        streamed = streamed_messages(parts.done)
        shown = self._shown.setdefault(reply.reply_id, {})
        for index, chunk in enumerate(split_message(text, MESSAGE_LIMIT)):
            if index not in streamed:
                sent = await self._send(reply, channel, chunk, stream_part(index), index, None)
                await parts.record(stream_part(index), str(sent.id))
                await self._remember_chain(reply, sent)
            elif shown.get(index) != chunk:
                await channel.get_partial_message(int(streamed[index])).edit(content=chunk)
            shown[index] = chunk

    async def post_reply(self, reply: Reply, parts: PostedParts) -> None:
        if reply.kind == "support":
            await self._post_support_alert(reply, parts)
            return
        conversation = reply.conversation
        channel = self.client.get_partial_messageable(int(conversation.channel))
        chunks = split_message(reply.text, MESSAGE_LIMIT)
        last = len(chunks) - 1
        rated = "feedback" in reply.actions
        streamed = streamed_messages(parts.done)
        self._shown.pop(reply.reply_id, None)
        for index, chunk in enumerate(chunks):
            if index in parts.done:
                continue  # posted before a crash or a retry
            view = _buttons(reply) if index == last else None  # under the last part
            if index in streamed:  # shown while it was generated: becomes the final part
                try:
                    sent = await channel.get_partial_message(int(streamed[index])).edit(
                        content=chunk, view=view
                    )
                except discord.NotFound:  # deleted meanwhile: post it anew
                    sent = await self._send(reply, channel, chunk, index, index, view)
            else:
                sent = await self._send(reply, channel, chunk, index, index, view)
            if index == last and rated:  # before the reactions, so that none is missed
                await self.redis.set(
                    self.keys.reply_of_message(PLATFORM, conversation.channel, str(sent.id)),
                    reply.reply_id,
                    ex=POSTED_TTL_S,
                )
            await parts.record(index, str(sent.id))
            if index == last and rated:
                await _add_reactions(sent, list(FEEDBACK_EMOJI))
            await self._remember_chain(reply, sent)
        for index, message_id in streamed.items():  # streamed beyond the final reply
            if index > last:
                with contextlib.suppress(discord.HTTPException):
                    await channel.get_partial_message(int(message_id)).delete()

    async def _send(
        self,
        reply: Reply,
        channel: discord.PartialMessageable,
        chunk: str,
        part: int,
        index: int,
        view: discord.ui.View | None,
    ) -> discord.Message:
        """Post one part of a reply (the first one as a reply to the customer's message)."""
        reference = None
        if reply.reply_to and index == 0:  # a notice (the bot is back…) answers no message
            reference = discord.MessageReference(
                message_id=int(reply.reply_to),
                channel_id=int(reply.conversation.channel),
                fail_if_not_exists=False,
            )
        try:
            return await channel.send(
                chunk,
                # Discord drops a second message with the same nonce (enforce_nonce): a
                # part posted just before a crash is not posted twice.
                nonce=part_nonce(reply.reply_id, part),
                reference=reference,  # type: ignore[arg-type]
                allowed_mentions=REPLY_MENTIONS,
                view=view,  # type: ignore[arg-type]
            )
        except (discord.Forbidden, discord.NotFound) as exc:
            raise PermanentPostError(f"Discord refused it: {exc}") from exc

    async def _remember_chain(self, reply: Reply, sent: discord.Message) -> None:
        conversation = reply.conversation
        if conversation.thread:  # a reply to this message continues the conversation
            await self.redis.set(
                self.keys.reply_chain(PLATFORM, conversation.channel, str(sent.id)),
                conversation.thread,
                ex=self.history_ttl_s,
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
        # The alert names the customer: their display name is shown, never interpreted.
        said = discord.utils.escape_mentions(discord.utils.escape_markdown(reply.text))
        text = f"{mention}🚨 {said} Open the conversation: {link}"
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


def part_nonce(reply_id: str, part: int) -> str:
    """A stable nonce for one part of one reply (Discord allows 25 characters)."""
    digest = hashlib.sha256(f"{reply_id}#{part}".encode()).hexdigest()
    return str(int(digest[:16], 16))[:25]


def jump_link(conversation: ConversationKey, reply_to: str) -> str:
    """Discord's link to the conversation: its root message (a reply chain) or the message
    answered (a thread, whose id is the channel; a DM)."""
    guild = "@me" if conversation.workspace == "dm" else conversation.workspace
    link = f"https://discord.com/channels/{guild}/{conversation.channel}"
    message = conversation.thread or reply_to
    return f"{link}/{message}" if message else link


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
