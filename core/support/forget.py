"""Forgetting a user: safe to ask for, complete when done.

Only a clear request starts it ("forget me", "delete my data"; not "don't delete my data"
nor "how do I delete my messages in the app?"), and the bot first asks the user to confirm
(`ForgetRequests`: a short-lived marker per conversation and user). Then, holding each
conversation's lock so that no generation in flight writes it back:

- every conversation the user wrote in is found (the user's index, and a scan of every
  history, so old shared threads and imported transcripts are not missed);
- the user's messages and ratings go; a conversation left with no other customer is
  deleted whole; in a shared one, the user's id and names are scrubbed from what others
  wrote and from the bot's replies, and a handoff on their behalf ends;
- stream entries that name them or belong to a deleted conversation, their cached display
  names, rate-limit state and the index go too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from core.conversation import ConversationKey
from core.keys import Keys
from core.redis_conn import Redis
from core.store import ConversationStore

log = logging.getLogger(__name__)

FORGET_CONFIRM_TEXT = (
    "I can delete everything I've stored about you: your messages and ratings in every "
    'conversation with me. This can\'t be undone. Reply "yes" to go ahead, or anything '
    "else to keep them."
)
FORGET_DONE = (
    "Done: I've deleted your messages and feedback from my records. "
    "(Messages still shown in this chat are kept by the chat service, not by me.)"
)
CONFIRM_WINDOW_S = 600
SCRUBBED = "[removed]"
MIN_SCRUB_CHARS = 3  # shorter names would wreck other people's words

_REQUEST = re.compile(
    r"^\s*(?:(?:hi|hey|hello)[\s,!.]+)?"
    r"(?:(?:please|pls|kindly)\s+|(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"|i\s+(?:want|would\s+like|'d\s+like|need)\s+(?:you\s+)?to\s+)?"
    r"(?:forget\s+(?:about\s+)?(?:me|everything\s+about\s+me|all\s+about\s+me)"
    r"|(?:delete|erase|remove|wipe|purge)\s+(?:all\s+(?:of\s+)?)?my\s+(?:personal\s+)?"
    r"(?:data|messages|conversations?|history|information|info|details|records)"
    r"|(?:delete|erase|remove)\s+me)"
    r"(?:\s+(?:please|now|entirely|completely|permanently|from\s+your\s+"
    r"(?:records|system|database|memory)))*"
    r"[\s.!?]*$",
    re.IGNORECASE,
)
_YES = re.compile(
    r"^\s*(?:yes|y|yep|yeah|yup|confirm(?:ed)?|sure|ok(?:ay)?|go\s+ahead|do\s+it|please\s+do)"
    r"(?:[\s,]+(?:please|delete(?:\s+(?:it|them|my\s+data|everything))?|do\s+it|go\s+ahead|"
    r"i'm\s+sure|i\s+am\s+sure))*[\s.!]*$",
    re.IGNORECASE,
)


def is_forget_request(text: str) -> bool:
    return bool(_REQUEST.match(text))


def is_confirmation(text: str) -> bool:
    return bool(_YES.match(text))


class ForgetRequests:
    """Which users were asked to confirm that they want to be forgotten."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def ask(self, conversation: ConversationKey, user_id: str) -> None:
        await self.redis.set(
            self.keys.forget_request(conversation, user_id), "1", ex=CONFIRM_WINDOW_S
        )

    async def asked(self, conversation: ConversationKey, user_id: str) -> bool:
        """Whether a confirmation is pending (left as it is)."""
        return bool(await self.redis.exists(self.keys.forget_request(conversation, user_id)))

    async def take(self, conversation: ConversationKey, user_id: str) -> bool:
        """Whether a confirmation was pending (it is cleared either way)."""
        return bool(await self.redis.delete(self.keys.forget_request(conversation, user_id)))


# KEYS: history.  ARGV: author id, then the words to scrub (lower case).  Removes that
# author's messages and scrubs the words from the others' texts (case-insensitively);
# returns {removed seqs (JSON), user messages by others left, the author's names (JSON)}.
_REMOVE_AUTHOR = """
local function scrub(text, words)
  for _, word in ipairs(words) do
    local lower, out, i = string.lower(text), {}, 1
    while true do
      local a, b = string.find(lower, word, i, true)
      if not a then table.insert(out, string.sub(text, i)); break end
      table.insert(out, string.sub(text, i, a - 1)); table.insert(out, ARGV[2])
      i = b + 1
    end
    text = table.concat(out)
  end
  return text
end
local raw = redis.call('LRANGE', KEYS[1], 0, -1)
local removed, names, others, words = {}, {}, 0, {}
for n = 3, #ARGV do table.insert(words, ARGV[n]) end
for _, item in ipairs(raw) do
  local msg = cjson.decode(item)
  if msg['author_id'] == ARGV[1] then
    table.insert(removed, msg['seq'])
    local name = string.lower(tostring(msg['author_name'] or ''))
    if #name >= 3 then table.insert(names, name); table.insert(words, name) end
  end
end
local kept = {}
for _, item in ipairs(raw) do
  local msg = cjson.decode(item)
  if msg['author_id'] ~= ARGV[1] then
    if msg['role'] == 'user' then others = others + 1 end
    local text = scrub(tostring(msg['text'] or ''), words)
    if text ~= msg['text'] then msg['text'] = text; item = cjson.encode(msg) end
    table.insert(kept, item)
  end
end
local ttl = redis.call('TTL', KEYS[1])
redis.call('DEL', KEYS[1])
if #kept > 0 then
  redis.call('RPUSH', KEYS[1], unpack(kept))
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
end
return {cjson.encode(removed), others, cjson.encode(names)}
"""


@dataclass
class ForgetReport:
    conversations_deleted: list[str] = field(default_factory=list)
    conversations_edited: list[str] = field(default_factory=list)
    messages_removed: int = 0
    ratings_removed: int = 0
    names: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (
            f"{self.messages_removed} messages and {self.ratings_removed} ratings removed; "
            f"{len(self.conversations_deleted)} conversations deleted, "
            f"{len(self.conversations_edited)} shared conversations edited"
        )


class Forgetter:
    def __init__(self, store: ConversationStore, lock_wait_s: float) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys
        self.lock_wait_s = lock_wait_s
        self._remove_author = self.redis.register_script(_REMOVE_AUTHOR)

    async def forget(
        self, platform: str, user_id: str, holding: ConversationKey | None = None
    ) -> ForgetReport:
        """`holding`: a conversation whose lock the caller already holds."""
        report = ForgetReport()
        names = await self._cached_names(platform, user_id)
        for conversation in sorted(await self._conversations_of(platform, user_id), key=str):
            if conversation == holding:
                await self._forget_in(conversation, user_id, names, report)
                continue
            async with self.store.lock(conversation, self.lock_wait_s * 2) as lock:
                await self._wait_for(lock)
                await self._forget_in(conversation, user_id, names, report)
        words = {user_id.lower(), *report.names, *names}
        await self._drop_stream_entries(platform, report.conversations_deleted, words)
        async for key in self.redis.scan_iter(
            match=self.keys.display_name_pattern(platform, user_id)
        ):
            await self.redis.delete(key)
        await self.redis.delete(
            self.keys.user_conversations(platform, user_id),
            self.keys.rate(platform, user_id),
            self.keys.rate_notice(platform, user_id),
        )
        log.info("forgot user %s on %s: %s", user_id, platform, report.summary())
        return report

    async def _wait_for(self, lock: Any) -> None:
        deadline = time.monotonic() + self.lock_wait_s
        while not lock.held and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await lock.acquire()
        if not lock.held:
            log.warning("forgetting in %s without its lock (busy)", lock.conversation.id)

    async def _cached_names(self, platform: str, user_id: str) -> set[str]:
        names = set()
        async for key in self.redis.scan_iter(
            match=self.keys.display_name_pattern(platform, user_id)
        ):
            name = await self.redis.get(key)
            if name and len(str(name)) >= MIN_SCRUB_CHARS:
                names.add(str(name).lower())
        return names

    async def _conversations_of(self, platform: str, user_id: str) -> set[ConversationKey]:
        """The user's index, and every history they wrote in (scanned: the index expires
        sooner than shared threads, and imports are not indexed)."""
        found = set()
        for raw in await self.redis.smembers(self.keys.user_conversations(platform, user_id)):
            found.add(ConversationKey.from_id(str(raw)))
        async for key in self.redis.scan_iter(match=self.keys.history_pattern):
            conversation_id = self.keys.conversation_of_history(str(key))
            if conversation_id is None or not conversation_id.startswith(f"{platform}:"):
                continue
            items = await self.redis.lrange(key, 0, -1)
            if any(_author_of(str(item)) == user_id for item in items):
                found.add(ConversationKey.from_id(conversation_id))
        return found

    async def _forget_in(
        self, conversation: ConversationKey, user_id: str, names: set[str], report: ForgetReport
    ) -> None:
        words = sorted({user_id.lower(), *names}, key=len, reverse=True)
        words = [w for w in words if len(w) >= MIN_SCRUB_CHARS]
        removed_json, others, names_json = await self._remove_author(
            keys=[self.keys.history(conversation)], args=[user_id, SCRUBBED, *words]
        )
        removed = json.loads(removed_json) if removed_json not in ("{}", "[]") else []
        report.names.update(json.loads(names_json) if names_json not in ("{}", "[]") else [])
        report.messages_removed += len(removed)
        ratings = await self.redis.hgetall(self.keys.feedback(conversation))
        mine = [f for f in ratings if str(f).endswith(f"|{user_id}")]
        report.ratings_removed += len(mine)
        if int(others) == 0:
            pattern = self.keys.conversation_pattern(conversation)
            keys = [k async for k in self.redis.scan_iter(match=pattern)]
            keys = [k for k in keys if str(k) != self.keys.lock(conversation)]
            if keys:
                await self.redis.delete(*keys)
            report.conversations_deleted.append(conversation.id)
            return
        if mine:
            await self.redis.hdel(self.keys.feedback(conversation), *mine)
        handoff = await self.redis.hget(self.keys.handoff(conversation), "customer_id")
        if handoff == user_id:
            await self.redis.delete(self.keys.handoff(conversation))
        await self._drop_markers(conversation, {int(s) for s in removed})
        report.conversations_edited.append(conversation.id)

    async def _drop_stream_entries(
        self, platform: str, conversation_ids: list[str], words: set[str]
    ) -> None:
        """Entries of deleted conversations, or naming the user, from the jobs, outbox and
        dead-letter streams (trimmed to what is unfinished, so the scan stays short)."""
        wanted = set(conversation_ids)
        needles = [w for w in words if len(w) >= MIN_SCRUB_CHARS]
        for stream in (self.keys.jobs, self.keys.outbox(platform), self.keys.dead_letter):
            entries: Any = await self.redis.xrange(stream)
            doomed = []
            for entry_id, fields in entries:
                text = json.dumps(fields, ensure_ascii=False).lower()
                if fields.get("conversation") in wanted or any(n in text for n in needles):
                    doomed.append(entry_id)
            if doomed:
                await self.redis.xdel(stream, *doomed)

    async def _drop_markers(self, conversation: ConversationKey, seqs: set[int]) -> None:
        """Dedupe markers of the removed messages (their value is the message's seq)."""
        if not seqs:
            return
        async for key in self.redis.scan_iter(match=self.keys.seen(conversation, "*")):
            value = str(await self.redis.get(key) or "").lstrip("q")
            if value.isdigit() and int(value) in seqs:
                await self.redis.delete(key)


def _author_of(item: str) -> str | None:
    try:
        data = json.loads(item)
    except ValueError:
        return None
    return str(data.get("author_id")) if isinstance(data, dict) else None
