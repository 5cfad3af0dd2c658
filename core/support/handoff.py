"""Handing a conversation to a human agent, and back.

While a handoff is active (`Keys.handoff`), the bot stays quiet in that conversation: the
customer's messages are still recorded, and messages from anyone else in it (the agents) are
recorded with the `human_agent` role, so that the model knows what was said when it resumes.
An agent releases the conversation (a button, `chatbot handoff release`), and the bot answers
the next message again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from core.conversation import ConversationKey, Message, Reply, ReplyId
from core.jobs import Outbox
from core.keys import Keys
from core.redis_conn import Redis, with_retry

log = logging.getLogger(__name__)

HANDOFF_STARTED = (
    "I've asked a person from our support team to join this conversation; they'll reply "
    "here. I'll stay quiet until they hand it back to me."
)
HANDOFF_ALREADY = "A person from our support team has been asked to join; they'll reply here."
HANDOFF_NO_CONTACT = (
    "I've flagged this conversation for our support team; a person will reply here as soon "
    "as they can. I'll stay quiet until they hand it back to me."
)
HANDOFF_RELEASED = "Thanks for waiting! I'm back; ask me anything, or ask for a person again."


@dataclass(frozen=True)
class Handoff:
    customer_id: str
    customer_name: str
    reason: str
    since: float

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Handoff:
        return cls(
            customer_id=raw.get("customer_id", ""),
            customer_name=raw.get("customer_name", ""),
            reason=raw.get("reason", ""),
            since=float(raw.get("since", 0)),
        )


# KEYS: handoff.  ARGV: customer id, name, reason, since, ttl_s.  1 if started.
_START = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'customer_id', ARGV[1], 'customer_name', ARGV[2],
  'reason', ARGV[3], 'since', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
ALERT_COOLDOWN_S = 300


class Handoffs:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._start = redis.register_script(_START)

    async def get(self, conversation: ConversationKey) -> Handoff | None:
        raw = await self.redis.hgetall(self.keys.handoff(conversation))
        return Handoff.from_hash({str(k): str(v) for k, v in raw.items()}) if raw else None

    async def start(
        self, conversation: ConversationKey, customer_id: str, customer_name: str, reason: str
    ) -> Handoff | None:
        """Mark the conversation handed off (atomically, with its TTL); None when it
        already was."""
        handoff = Handoff(customer_id, customer_name, reason, time.time())
        started = await self._start(
            keys=[self.keys.handoff(conversation)],
            args=[customer_id, customer_name, reason, handoff.since, self.ttl_s],
        )
        if not started:
            return None
        log.info("conversation %s handed to a human (%s)", conversation.id, reason)
        return handoff

    async def may_alert(self, conversation: ConversationKey) -> bool:
        """At most one support alert per conversation per `ALERT_COOLDOWN_S`: a handoff
        and release in a loop cannot ping the support team without end."""
        key = self.keys.handoff_alerted(conversation)
        return bool(await self.redis.set(key, "1", nx=True, ex=ALERT_COOLDOWN_S))

    async def release(self, conversation: ConversationKey, by: str) -> Handoff | None:
        """End the handoff; returns what it was, or None when there was none."""
        key = self.keys.handoff(conversation)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.delete(key)
            raw, _ = await pipe.execute()
        if not raw:
            return None
        log.info("conversation %s released back to the bot by %s", conversation.id, by)
        return Handoff.from_hash({str(k): str(v) for k, v in raw.items()})


def support_notice(
    conversation: ConversationKey,
    handoff: Handoff,
    *,
    support_channel: str,
    support_mention: str,
    reply_to: str,
) -> Reply:
    """The message for the support channel; the adapter adds the mention and a link."""
    return Reply(
        reply_id=str(ReplyId.support_alert(conversation, handoff.since)),
        conversation=conversation,
        text=(
            f"{handoff.customer_name or handoff.customer_id} asked for a person ({handoff.reason})."
        ),
        reply_to=reply_to,
        covers_seq=0,
        kind="support",
        meta={"target_channel": support_channel, "mention": support_mention},
    )


async def release_and_announce(
    handoffs: Handoffs, outbox: Outbox, conversation: ConversationKey, by: str
) -> bool:
    """Release a handoff and tell the conversation that the bot is back."""
    released = await handoffs.release(conversation, by)
    if released is None:
        return False
    notice = Reply(
        reply_id=str(ReplyId.release_notice(conversation, time.time())),
        conversation=conversation,
        text=HANDOFF_RELEASED,
        reply_to="",
        covers_seq=0,
        kind="notice",
        meta={"released_by": by},
    )
    await outbox.publish(notice)
    return True


async def hand_over(
    handoffs: Handoffs,
    outbox: Outbox,
    conversation: ConversationKey,
    *,
    customer: Message,
    reason: str,
    support_channel: str,
    support_mention: str,
) -> Handoff | None:
    """Start a handoff and alert the support channel; None when one was already active."""
    handoff = await handoffs.start(conversation, customer.author_id, customer.author_name, reason)
    if handoff is None:
        return None
    if support_channel and not await handoffs.may_alert(conversation):
        log.info("handoff in %s: the support team was alerted recently; not again", conversation.id)
        return handoff
    if support_channel:
        alert = support_notice(
            conversation,
            handoff,
            support_channel=support_channel,
            support_mention=support_mention,
            reply_to=customer.message_id,
        )
        await with_retry("publishing a support alert", lambda: outbox.publish(alert))
        return handoff
    log.warning(
        "handoff in %s: no support contact is configured for %s %s; set one with "
        "`chatbot workspace set %s %s --support-channel ID` or CHATBOT_SUPPORT_CHANNEL",
        conversation.id,
        conversation.platform,
        conversation.workspace,
        conversation.platform,
        conversation.workspace,
    )
    return handoff
