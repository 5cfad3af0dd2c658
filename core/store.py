"""Conversation history and per-conversation state in Redis.

Each write that must be atomic is one Lua script over keys of a single conversation (one
hash slot), so it stays valid on Redis Cluster.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from types import TracebackType

from core.conversation import ConversationKey, Message, Reply
from core.keys import DEDUPE_TTL_S, POSTED_TTL_S, Keys
from core.redis_conn import Redis, with_retry
from core.settings import Settings

log = logging.getLogger(__name__)

# KEYS: history, state, seen.  ARGV: message json, max messages, ttl_s, dedupe ttl_s,
# state ttl_s.
# Returns {is_new, seq, settled}.
_ADD_MESSAGE = """
local prev = redis.call('GET', KEYS[3])
if prev then
  local settled = 0
  if string.sub(prev, 1, 1) == 'q' then settled = 1; prev = string.sub(prev, 2) end
  return {0, tonumber(prev) or 0, settled}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local msg = cjson.decode(ARGV[1])
msg['seq'] = seq
redis.call('RPUSH', KEYS[1], cjson.encode(msg))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[3], seq, 'EX', ARGV[4])
return {1, seq, 0}
"""

# KEYS: seen.  Marks the message settled (job enqueued, or stored during a handoff),
# keeping the marker's TTL.
_MARK_SETTLED = """
local prev = redis.call('GET', KEYS[1])
if prev and string.sub(prev, 1, 1) ~= 'q' then
  redis.call('SET', KEYS[1], 'q' .. prev, 'KEEPTTL')
end
return 1
"""

# KEYS: history, state.  ARGV: covers_seq, assistant message json or '', reply json,
# max messages, ttl_s, state ttl_s.  Returns 1 when committed, 0 when that seq was
# already answered.
_COMMIT_REPLY = """
local answered = tonumber(redis.call('HGET', KEYS[2], 'answered') or '0') or 0
if answered >= tonumber(ARGV[1]) then return 0 end
if ARGV[2] ~= '' then
  local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  local msg = cjson.decode(ARGV[2])
  msg['seq'] = seq
  redis.call('RPUSH', KEYS[1], cjson.encode(msg))
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
redis.call('HSET', KEYS[2], 'answered', ARGV[1], 'pending_reply', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
"""

# KEYS: state.  ARGV: reply_id.  Clears the pending reply once it is in the outbox.
_CLEAR_PENDING = """
local raw = redis.call('HGET', KEYS[1], 'pending_reply')
if raw and cjson.decode(raw)['reply_id'] == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'pending_reply')
  return 1
end
return 0
"""

_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class AddResult:
    seq: int
    is_new: bool
    settled: bool  # for a duplicate: whether it was fully handled (see `mark_settled`)


@dataclass(frozen=True)
class ConversationState:
    seq: int
    answered: int
    pending_reply: Reply | None


# KEYS: state.  ARGV: seq.  Marks user messages up to seq answered without a reply (the
# bot stays quiet during a handoff); a conversation that no longer exists is left alone.
_MARK_ANSWERED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local answered = tonumber(redis.call('HGET', KEYS[1], 'answered') or '0') or 0
if answered >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'answered', ARGV[1])
return 1
"""


class ConversationStore:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        max_messages: int,
        ttl_s: int,
        settings: Settings | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        # The process settings, for defaults of per-workspace settings.
        self.settings = settings or Settings()
        self.max_messages = max_messages
        self.ttl_s = ttl_s
        # `seq` numbers the messages and names the replies (`ReplyId`); it must never
        # restart while the outbox still remembers replies it posted under those names.
        self.state_ttl_s = max(ttl_s, POSTED_TTL_S)
        self._add = redis.register_script(_ADD_MESSAGE)
        self._mark_settled = redis.register_script(_MARK_SETTLED)
        self._commit = redis.register_script(_COMMIT_REPLY)
        self._clear_pending = redis.register_script(_CLEAR_PENDING)
        self._renew = redis.register_script(_RENEW_LOCK)
        self._release = redis.register_script(_RELEASE_LOCK)
        self._mark_answered = redis.register_script(_MARK_ANSWERED)
        # The locks this process holds now, for the heartbeat that renews them.
        self.held_locks: set[ConversationLock] = set()

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> ConversationStore:
        return cls(
            redis,
            Keys(settings.namespace),
            max_messages=settings.history_max_messages,
            ttl_s=settings.history_ttl_s,
            settings=settings,
        )

    async def add_message(
        self, conversation: ConversationKey, message: Message, dedupe_id: str | None = None
    ) -> AddResult:
        """Append a message unless `dedupe_id` (default: its message id) was seen already."""
        k = self.keys
        seen = k.seen(conversation, dedupe_id or message.message_id)
        is_new, seq, settled = await self._add(
            keys=[k.history(conversation), k.state(conversation), seen],
            args=[
                message.to_json(),
                self.max_messages,
                self.ttl_s,
                DEDUPE_TTL_S,
                self.state_ttl_s,
            ],
        )
        return AddResult(seq=int(seq), is_new=bool(is_new), settled=bool(settled))

    async def mark_settled(self, conversation: ConversationKey, dedupe_id: str) -> None:
        """The message's dedupe marker says it was fully handled (its job enqueued, or it
        was stored during a handoff), so a retry of the same event is a duplicate."""
        await self._mark_settled(keys=[self.keys.seen(conversation, dedupe_id)])

    async def history(self, conversation: ConversationKey) -> list[Message]:
        """The messages, oldest first; a corrupt entry is logged and left out."""
        raw = await self.redis.lrange(self.keys.history(conversation), 0, -1)
        messages = []
        for position, item in enumerate(raw):
            try:
                messages.append(Message.from_json(item))
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "history entry %d of %s is corrupt (%s: %s); skipped",
                    position,
                    conversation.id,
                    type(exc).__name__,
                    exc,
                )
        return messages

    async def state(self, conversation: ConversationKey) -> ConversationState:
        """A corrupt counter reads as 0 and a corrupt pending reply as none (logged)."""
        found = await self.redis.hgetall(self.keys.state(conversation))
        raw = {str(k): str(v) for k, v in found.items()}
        return ConversationState(
            seq=_counter(raw, "seq", conversation),
            answered=_counter(raw, "answered", conversation),
            pending_reply=_pending_reply(raw, conversation),
        )

    async def commit_reply(self, reply: Reply, message: Message | None) -> bool:
        """Record `reply` as answering up to `reply.covers_seq`, once.

        The assistant message (if any) joins the history and the reply waits in
        `pending_reply` until `clear_pending` confirms it reached the outbox.
        """
        conv = reply.conversation
        committed = await self._commit(
            keys=[self.keys.history(conv), self.keys.state(conv)],
            args=[
                reply.covers_seq,
                message.to_json() if message else "",
                json.dumps(reply.to_fields(), ensure_ascii=False),
                self.max_messages,
                self.ttl_s,
                self.state_ttl_s,
            ],
        )
        return bool(committed)

    async def mark_answered(self, conversation: ConversationKey, seq: int) -> bool:
        return bool(await self._mark_answered(keys=[self.keys.state(conversation)], args=[seq]))

    async def clear_pending(self, reply: Reply) -> None:
        await self._clear_pending(keys=[self.keys.state(reply.conversation)], args=[reply.reply_id])

    async def reset(self, conversation: ConversationKey) -> None:
        """A user's "reset": the history, thread markers and handoff go.

        Kept: the state (message numbering goes on, so new replies get new names), records
        of posted parts, answers and ratings, and dedupe markers (they expire on their
        own; forgetting a user removes them: `UserData.forget`)."""
        k = self.keys
        await self.redis.delete(
            k.history(conversation),
            k.joined(conversation),
            k.placeholder(conversation),
            k.handoff(conversation),
        )

    def lock(self, conversation: ConversationKey, ttl_s: float) -> ConversationLock:
        """`async with store.lock(c, ttl_s) as lock:` tries once; `lock.held` says if it
        got it, and leaving the block releases it."""
        return ConversationLock(self, conversation, ttl_s)

    async def _acquire_lock(self, conversation: ConversationKey, token: str, ttl_s: float) -> bool:
        key = self.keys.lock(conversation)
        return bool(await self.redis.set(key, token, nx=True, px=int(ttl_s * 1000)))

    async def _renew_lock(self, conversation: ConversationKey, token: str, ttl_s: float) -> bool:
        renewed = await self._renew(
            keys=[self.keys.lock(conversation)], args=[token, int(ttl_s * 1000)]
        )
        return bool(renewed)

    async def _release_lock(self, conversation: ConversationKey, token: str) -> None:
        await self._release(keys=[self.keys.lock(conversation)], args=[token])


def _counter(raw: dict[str, str], name: str, conversation: ConversationKey) -> int:
    try:
        return int(raw.get(name, 0))
    except ValueError:
        log.error("state field %s of %s is not a number: %r", name, conversation.id, raw[name])
        return 0


def _pending_reply(raw: dict[str, str], conversation: ConversationKey) -> Reply | None:
    pending = raw.get("pending_reply")
    if not pending:
        return None
    try:
        return Reply.from_fields(json.loads(pending))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("the pending reply of %s is corrupt (%s); dropped", conversation.id, exc)
        return None


class ConversationLock:
    """One worker's hold on a conversation (`Keys.lock`): a random token under an expiring
    key, so that only its holder can renew or release it."""

    def __init__(self, store: ConversationStore, conversation: ConversationKey, ttl_s: float):
        self.store = store
        self.conversation = conversation
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self.held = False

    async def acquire(self) -> bool:
        self.held = await self.store._acquire_lock(self.conversation, self.token, self.ttl_s)
        if self.held:
            self.store.held_locks.add(self)
        return self.held

    async def renew(self) -> bool:
        """Extend the hold; False (and a warning) when it expired and may be another's."""
        if not self.held:
            return False
        if await self.store._renew_lock(self.conversation, self.token, self.ttl_s):
            return True
        log.warning("lost the lock of %s: it expired before it was renewed", self.conversation.id)
        return False

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self.store.held_locks.discard(self)
        await with_retry(
            "releasing a conversation lock",
            lambda: self.store._release_lock(self.conversation, self.token),
        )

    async def __aenter__(self) -> ConversationLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
