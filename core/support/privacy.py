"""User data controls: forgetting a user, exporting and importing a transcript.

Every conversation a user writes in is listed in `Keys.user_conversations` (expiring with the
conversations). Forgetting a user removes their messages and ratings from each of those
conversations; a conversation left with no other customer in it is deleted whole (the bot's
replies in it were about that user), as are their cached display names and the index itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.conversation import ConversationKey, Message
from core.keys import Keys
from core.redis_conn import Redis
from core.store import ConversationStore

log = logging.getLogger(__name__)

FORGET_DONE = (
    "Done: I've deleted your messages and feedback from my records. "
    "(Messages still shown in this chat are kept by the chat service, not by me.)"
)

# KEYS: history.  ARGV: author id.  Removes that author's messages; returns
# {removed seqs as a JSON list, number of user messages by others left}.
_REMOVE_AUTHOR = """
local kept, removed, others = {}, {}, 0
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local msg = cjson.decode(raw)
  if msg['author_id'] == ARGV[1] then
    table.insert(removed, msg['seq'])
  else
    table.insert(kept, raw)
    if msg['role'] == 'user' then others = others + 1 end
  end
end
if #removed > 0 then
  local ttl = redis.call('TTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  if #kept > 0 then
    redis.call('RPUSH', KEYS[1], unpack(kept))
    if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  end
end
return {cjson.encode(removed), others}
"""


@dataclass
class ForgetReport:
    conversations_deleted: list[str] = field(default_factory=list)
    conversations_edited: list[str] = field(default_factory=list)
    messages_removed: int = 0
    ratings_removed: int = 0

    def summary(self) -> str:
        return (
            f"{self.messages_removed} messages and {self.ratings_removed} ratings removed; "
            f"{len(self.conversations_deleted)} conversations deleted, "
            f"{len(self.conversations_edited)} shared conversations edited"
        )


class UserData:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._remove_author = redis.register_script(_REMOVE_AUTHOR)

    async def note_participation(self, platform: str, user_id: str, conversation_id: str) -> None:
        key = self.keys.user_conversations(platform, user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(key, conversation_id)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def forget(self, platform: str, user_id: str) -> ForgetReport:
        """Delete everything stored about `user_id` on `platform`."""
        report = ForgetReport()
        index = self.keys.user_conversations(platform, user_id)
        for conversation_id in sorted(await self.redis.smembers(index)):
            conversation = ConversationKey.from_id(str(conversation_id))
            await self._forget_in(conversation, user_id, report)
        async for key in self.redis.scan_iter(
            match=self.keys.display_name_pattern(platform, user_id)
        ):
            await self.redis.delete(key)
        await self.redis.delete(
            index, self.keys.rate(platform, user_id), self.keys.rate_notice(platform, user_id)
        )
        await self._drop_stream_entries(platform, report.conversations_deleted)
        log.info("forgot user %s on %s: %s", user_id, platform, report.summary())
        return report

    async def _forget_in(
        self, conversation: ConversationKey, user_id: str, report: ForgetReport
    ) -> None:
        removed_json, others = await self._remove_author(
            keys=[self.keys.history(conversation)], args=[user_id]
        )
        removed = json.loads(removed_json) if removed_json != "{}" else []
        report.messages_removed += len(removed)
        ratings = await self.redis.hgetall(self.keys.feedback(conversation))
        mine = [f for f in ratings if str(f).endswith(f"|{user_id}")]
        report.ratings_removed += len(mine)
        if int(others) == 0:
            pattern = self.keys.conversation_pattern(conversation)
            keys = [k async for k in self.redis.scan_iter(match=pattern)]
            if keys:
                await self.redis.delete(*keys)
            report.conversations_deleted.append(conversation.id)
            return
        if mine:
            await self.redis.hdel(self.keys.feedback(conversation), *mine)
        await self._drop_markers(conversation, {int(s) for s in removed})
        report.conversations_edited.append(conversation.id)

    async def _drop_stream_entries(self, platform: str, conversation_ids: list[str]) -> None:
        """Jobs, posted replies and dead letters of deleted conversations (streams are
        bounded, so this scan is too)."""
        if not conversation_ids:
            return
        wanted = set(conversation_ids)
        for stream in (self.keys.jobs, self.keys.outbox(platform), self.keys.dead_letter):
            entries: Any = await self.redis.xrange(stream)
            doomed = [
                entry_id for entry_id, fields in entries if fields.get("conversation") in wanted
            ]
            if doomed:
                await self.redis.xdel(stream, *doomed)

    async def _drop_markers(self, conversation: ConversationKey, seqs: set[int]) -> None:
        """Dedupe markers of the removed messages (their value is the message's seq)."""
        if not seqs:
            return
        pattern = self.keys.seen(conversation, "*")
        async for key in self.redis.scan_iter(match=pattern):
            value = await self.redis.get(key)
            if value is not None and int(str(value).lstrip("q")) in seqs:
                await self.redis.delete(key)


# -- transcripts -------------------------------------------------------------------------


def transcript_lines(conversation: ConversationKey, messages: Iterable[Message]) -> list[str]:
    """JSON Lines: one message per line, each naming its conversation."""
    lines = []
    for message in messages:
        data = json.loads(message.to_json())
        data["conversation"] = conversation.id
        lines.append(json.dumps(data, ensure_ascii=False))
    return lines


def parse_transcript(lines: Iterable[str]) -> tuple[ConversationKey | None, list[Message]]:
    """The conversation and messages of a JSON Lines transcript (blank lines ignored)."""
    conversation = None
    messages = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            conversation = ConversationKey.from_id(data.pop("conversation"))
            messages.append(Message.from_json(json.dumps(data)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not a transcript message ({exc})") from exc
    return conversation, messages


async def import_transcript(
    store: ConversationStore, conversation: ConversationKey, messages: Iterable[Message]
) -> int:
    """Append a transcript's messages to a conversation (new seqs; ids deduplicated)."""
    count = 0
    for message in messages:
        added = await store.add_message(conversation, message, f"import:{message.message_id}")
        count += added.is_new
    state = await store.state(conversation)
    # Imported messages are history, not questions waiting for an answer.
    await store.redis.hset(store.keys.state(conversation), "answered", state.seq)
    return count
