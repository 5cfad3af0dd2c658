"""Conversation history and per-conversation state in Redis.

Each write that must be atomic is one Lua script over keys of a single conversation (one
hash slot), so it stays valid on Redis Cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.conversation import ConversationKey, Message, Reply
from core.keys import DEDUPE_TTL_S, Keys
from core.redis_conn import Redis
from core.settings import Settings

# KEYS: history, state, seen.  ARGV: message json, max messages, ttl_s, dedupe ttl_s.
# Returns {is_new, seq, queued}.
_ADD_MESSAGE = """
local prev = redis.call('GET', KEYS[3])
if prev then
  local queued = 0
  if string.sub(prev, 1, 1) == 'q' then queued = 1; prev = string.sub(prev, 2) end
  return {0, tonumber(prev), queued}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local msg = cjson.decode(ARGV[1])
msg['seq'] = seq
redis.call('RPUSH', KEYS[1], cjson.encode(msg))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], seq, 'EX', ARGV[4])
return {1, seq, 0}
"""

# KEYS: seen.  Marks the message's job as enqueued, keeping the marker's TTL.
_MARK_QUEUED = """
local prev = redis.call('GET', KEYS[1])
if prev and string.sub(prev, 1, 1) ~= 'q' then
  redis.call('SET', KEYS[1], 'q' .. prev, 'KEEPTTL')
end
return 1
"""

# KEYS: history, state.  ARGV: covers_seq, assistant message json or '', reply json,
# max messages, ttl_s.  Returns 1 when committed, 0 when that seq was already answered.
_COMMIT_REPLY = """
local answered = tonumber(redis.call('HGET', KEYS[2], 'answered') or '0')
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
redis.call('EXPIRE', KEYS[2], ARGV[5])
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
    queued: bool  # for a duplicate: whether its job was already enqueued


@dataclass(frozen=True)
class ConversationState:
    seq: int
    answered: int
    pending_reply: Reply | None


# KEYS: state.  ARGV: seq.  Marks user messages up to seq answered without a reply (the
# bot stays quiet during a handoff); a conversation that no longer exists is left alone.
_MARK_ANSWERED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local answered = tonumber(redis.call('HGET', KEYS[1], 'answered') or '0')
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
        self._add = redis.register_script(_ADD_MESSAGE)
        self._mark_queued = redis.register_script(_MARK_QUEUED)
        self._commit = redis.register_script(_COMMIT_REPLY)
        self._clear_pending = redis.register_script(_CLEAR_PENDING)
        self._renew = redis.register_script(_RENEW_LOCK)
        self._release = redis.register_script(_RELEASE_LOCK)
        self._mark_answered = redis.register_script(_MARK_ANSWERED)

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
        is_new, seq, queued = await self._add(
            keys=[k.history(conversation), k.state(conversation), seen],
            args=[message.to_json(), self.max_messages, self.ttl_s, DEDUPE_TTL_S],
        )
        return AddResult(seq=int(seq), is_new=bool(is_new), queued=bool(queued))

    async def mark_queued(self, conversation: ConversationKey, dedupe_id: str) -> None:
        await self._mark_queued(keys=[self.keys.seen(conversation, dedupe_id)])

    async def history(self, conversation: ConversationKey) -> list[Message]:
        raw = await self.redis.lrange(self.keys.history(conversation), 0, -1)
        return [Message.from_json(item) for item in raw]

    async def state(self, conversation: ConversationKey) -> ConversationState:
        raw = await self.redis.hgetall(self.keys.state(conversation))
        pending = raw.get("pending_reply")
        return ConversationState(
            seq=int(raw.get("seq", 0)),
            answered=int(raw.get("answered", 0)),
            pending_reply=Reply.from_fields(json.loads(pending)) if pending else None,
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
            ],
        )
        return bool(committed)

    async def mark_answered(self, conversation: ConversationKey, seq: int) -> bool:
        return bool(await self._mark_answered(keys=[self.keys.state(conversation)], args=[seq]))

    async def clear_pending(self, reply: Reply) -> None:
        await self._clear_pending(keys=[self.keys.state(reply.conversation)], args=[reply.reply_id])

    async def clear(self, conversation: ConversationKey) -> None:
        """Forget a conversation (a user's "reset"): history, state and thread markers."""
        k = self.keys
        await self.redis.delete(
            k.history(conversation),
            k.state(conversation),
            k.joined(conversation),
            k.placeholder(conversation),
            k.handoff(conversation),
        )

    async def acquire_lock(self, conversation: ConversationKey, token: str, ttl_s: float) -> bool:
        key = self.keys.lock(conversation)
        return bool(await self.redis.set(key, token, nx=True, px=int(ttl_s * 1000)))

    async def renew_lock(self, conversation: ConversationKey, token: str, ttl_s: float) -> bool:
        renewed = await self._renew(
            keys=[self.keys.lock(conversation)], args=[token, int(ttl_s * 1000)]
        )
        return bool(renewed)

    async def release_lock(self, conversation: ConversationKey, token: str) -> None:
        await self._release(keys=[self.keys.lock(conversation)], args=[token])
