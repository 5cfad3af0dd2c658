"""The "working on it" message of a conversation, kept in Redis so that every adapter
replica agrees on it, and so that it is never left behind next to an answer.

The adapter posts it after acknowledging a message, in the background, while the worker
may already be answering: with a fast engine the answer can come first. The key
(`Keys.placeholder`) holds one of

- `posting:<message id>`: a working message for that message is being posted;
- `<ts>`: the working message posted, which the next reply replaces;
- `answered:<message id>`: a reply covering the messages up to that id went out without
  one, so a working message for any of them would come too late and is not posted.

Every change is a compare-and-set on the value read, so two parties never both think they
own the message: a working message is either replaced by its reply, or deleted by the
one who posted it, or never posted.
"""

from __future__ import annotations

import asyncio
import time

from core.conversation import ConversationKey
from core.keys import PLACEHOLDER_TTL_S, Keys
from core.redis_conn import Redis

POSTING = "posting:"
ANSWERED = "answered:"
# A working message being posted carries this TTL until it is posted: an adapter that dies
# in between does not hold up its conversation's replies for longer.
POSTING_TTL_S = 30
# How long a reply waits for a working message being posted, to replace it rather than
# post a message of its own beside it (a round trip to Slack, usually well under a second).
WAIT_FOR_POSTING_S = 3.0
ANSWERED_TTL_S = 600

# KEYS[1] the placeholder; ARGV: expected value ("" for none), new value ("" to delete),
# TTL in seconds. 1 when it was set.
_SWAP = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
end
return 1
"""


class WorkingMessages:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._swap = redis.register_script(_SWAP)

    async def claim(self, conversation: ConversationKey, message_id: str) -> bool:
        """True when a working message for `message_id` should be posted now (then call
        `posted` or `abandon`): there is none, none is being posted, and no reply covering
        that message has gone out already."""
        key = self.keys.placeholder(conversation)
        current = await self._get(key)
        if current and not current.startswith(ANSWERED):
            return False  # one working message per conversation at a time
        if current and not _before(current[len(ANSWERED) :], message_id):
            return False  # answered already (or by a reply whose reach is unknown)
        return await self._set(key, current, POSTING + message_id, POSTING_TTL_S)

    async def posted(self, conversation: ConversationKey, message_id: str, ts: str) -> bool:
        """Record the working message; False when a reply went out meanwhile (then the
        caller deletes its message)."""
        key = self.keys.placeholder(conversation)
        return await self._set(key, POSTING + message_id, ts, PLACEHOLDER_TTL_S)

    async def abandon(self, conversation: ConversationKey, message_id: str) -> None:
        """The working message could not be posted."""
        await self._set(self.keys.placeholder(conversation), POSTING + message_id, "", 0)

    async def take(self, conversation: ConversationKey, reply_to: str) -> str:
        """For a reply to the messages up to `reply_to`: the working message it should
        replace, or "" when it must be posted as a message of its own. Either way the
        conversation's working message is now spoken for: one being posted for a message
        the reply covers is deleted by its poster, and none is posted for them later."""
        key = self.keys.placeholder(conversation)
        deadline = time.monotonic() + WAIT_FOR_POSTING_S
        while True:
            current = await self._get(key)
            if current.startswith(POSTING):
                if _before(reply_to, current[len(POSTING) :]):
                    return ""  # being posted for a newer message, whose reply replaces it
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
            answered = reply_to if _order(reply_to) else ""
            earlier = current[len(ANSWERED) :] if current.startswith(ANSWERED) else ""
            if earlier and not _before(earlier, answered):
                answered = earlier  # a later reply went out first
            if await self._set(
                key, current, ANSWERED + answered if answered else "", ANSWERED_TTL_S
            ):
                is_posted = current and not current.startswith((POSTING, ANSWERED))
                return current if is_posted else ""

    async def _get(self, key: str) -> str:
        value = await self.redis.get(key)
        return str(value) if value is not None else ""

    async def _set(self, key: str, expected: str, new: str, ttl_s: int) -> bool:
        return bool(await self._swap(keys=[key], args=[expected, new, ttl_s]))


def _order(message_id: str) -> tuple[int, int] | None:
    """Slack's `ts` as numbers (seconds, sequence), to order messages; None for others."""
    seconds, _, sequence = message_id.partition(".")
    if not seconds.isdigit() or not (sequence.isdigit() or sequence == ""):
        return None
    return int(seconds), int(sequence or 0)


def _before(first: str, second: str) -> bool:
    """Whether message `first` is older than `second`; never for ids that cannot be
    ordered."""
    a, b = _order(first), _order(second)
    return a is not None and b is not None and a < b
