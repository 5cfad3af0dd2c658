"""The Slack adapter's commands and buttons: /ask, /reset, feedback, "Talk to a person",
"Yes, delete my data", "Hand back to the bot". Each is acknowledged at once and handled in
the background (`_later`); only the support team may release a handoff or reset a
channel's conversation.

A mixin of `SlackAdapter`: it uses the adapter's clients, stores and inbound path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any

from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.posting import SlackPoster
from core.conversation import ConversationKey
from core.jobs import Outbox
from core.keys import Keys
from core.redis_conn import TRANSIENT_ERRORS, Redis, with_retry
from core.settings import Settings
from core.store import ConversationStore
from core.support.agents import ONLY_AGENTS
from core.support.feedback import Feedback
from core.support.handoff import Handoffs, release_and_announce

log = logging.getLogger(__name__)

PLATFORM = "slack"
RESET_DONE = (
    "Done: I've forgotten our conversation in this channel. "
    "(Each thread has its own history; start a new thread to start afresh there.)"
)
RESET_FAILED = "Sorry, I couldn't reset our conversation just now. Please try again in a minute."
ASK_USAGE = "Ask me anything, for example: `/ask how do I reset my password?`"
NOT_IN_CHANNEL = "I can't post in this channel yet: invite me with `/invite @` and my name."
HANDOFF_REQUEST_TEXT = "talk to a person"
CONFIRM_TEXT = "yes"
FEEDBACK_THANKS = "Thanks for the feedback! It helps us improve the answers."
FEEDBACK_EXPIRED = "Sorry, that answer is too old to rate now."
RELEASE_NOT_ACTIVE = "This conversation is already back with the bot."
# Slack wants an answer within 3 s; past this, Redis errors fail the request (500) so that
# Slack delivers the event again, instead of acknowledging a message that was not stored.
INBOUND_PATIENCE_S = 1.5


class SlackCommands:
    redis: Redis
    keys: Keys
    settings: Settings
    client: AsyncWebClient
    poster: SlackPoster
    store: ConversationStore
    feedback: Feedback
    handoffs: Handoffs
    outbox_writer: Outbox

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    async def _submit(
        self,
        conversation: ConversationKey,
        event: dict[str, Any],
        context: AsyncBoltContext,
        give_up_after_s: float | None = INBOUND_PATIENCE_S,
    ) -> None:
        raise NotImplementedError

    async def _is_agent(self, team: str, user: str) -> bool:
        raise NotImplementedError

    async def _on_ask(
        self, ack: Any, respond: Any, command: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        question = (command.get("text") or "").strip()
        if not question:
            await ack(ASK_USAGE)
            return
        await ack()
        self._later(self._ask(respond, command, context, question))

    async def _ask(
        self, respond: Any, command: dict[str, Any], context: AsyncBoltContext, question: str
    ) -> None:
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
        await self._submit(conversation, event, context, give_up_after_s=None)

    async def _on_reset(self, ack: Any, command: dict[str, Any], context: AsyncBoltContext) -> None:
        team = context.team_id or command.get("team_id") or "unknown-team"
        conversation = ConversationKey(PLATFORM, team, command["channel_id"], "")
        direct = conversation.channel.startswith("D")
        if not direct and not await self._is_agent(team, str(command.get("user_id", ""))):
            await ack(ONLY_AGENTS)  # a channel's conversation is not one person's to wipe
            return
        try:
            await with_retry(
                "resetting a conversation",
                lambda: self.store.reset(conversation),
                give_up_at=time.monotonic() + INBOUND_PATIENCE_S,
            )
        except TRANSIENT_ERRORS:
            await ack(RESET_FAILED)
            return
        await ack(RESET_DONE)

    # -- buttons ------------------------------------------------------------------------

    async def _on_feedback(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        self._later(self._feedback(body))

    async def _feedback(self, body: dict[str, Any]) -> None:
        action = body["actions"][0]
        user, channel = body["user"]["id"], body["channel"]["id"]
        recorded = await self.feedback.rate(
            action["value"], user, helpful=action["action_id"] == "feedback_up"
        )
        await self.poster.ephemeral(
            channel, user, FEEDBACK_THANKS if recorded else FEEDBACK_EXPIRED
        )

    async def _on_handoff_request(
        self, ack: Any, body: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """The "Talk to a person" button: as if the customer had asked in words, so the
        request takes the same path (and the same history) as a typed one."""
        await ack()
        self._later(self._handoff_request(body, context))

    async def _handoff_request(self, body: dict[str, Any], context: AsyncBoltContext) -> None:
        await self._button_says(body, context, HANDOFF_REQUEST_TEXT)

    async def _on_forget_confirm(
        self, ack: Any, body: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """ "Yes, delete my data": as if the user had answered "yes" in words; it deletes
        only the data of a user who asked (anyone else's "yes" is a plain message)."""
        await ack()
        self._later(self._button_says(body, context, CONFIRM_TEXT))

    async def _button_says(
        self, body: dict[str, Any], context: AsyncBoltContext, text: str
    ) -> None:
        conversation = ConversationKey.from_id(body["actions"][0]["value"])
        event = {
            "user": body["user"]["id"],
            "text": text,
            "ts": str(body["actions"][0].get("action_ts") or body["trigger_id"]),
            "channel_type": "im" if conversation.channel.startswith("D") else "",
        }
        await self._submit(conversation, event, context, give_up_after_s=None)

    async def _on_handoff_release(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        self._later(self._handoff_release(body))

    async def _handoff_release(self, body: dict[str, Any]) -> None:
        conversation = ConversationKey.from_id(body["actions"][0]["value"])
        user = body["user"]["id"]
        if conversation.platform != PLATFORM or not await self._is_agent(
            conversation.workspace, user
        ):
            await self.poster.ephemeral(body["channel"]["id"], user, ONLY_AGENTS)
            return
        released = await release_and_announce(self.handoffs, self.outbox_writer, conversation, user)
        if not released:
            await self.poster.ephemeral(body["channel"]["id"], user, RELEASE_NOT_ACTIVE)
