"""What the bot answered, how users rated it, and the counters `chatbot stats` prints.

Each answer is recorded in its conversation (`Keys.answers`: kind, sources, and the spans
of its text the model generated) and expires with it. A rating (+1 / -1, one per user per
answer; a second click changes it) is stored beside it (`Keys.feedback`). Counters per
workspace (`Keys.stats`) are plain numbers with no personal data, kept after conversations
expire.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from core.conversation import ConversationKey, Reply, ReplyId
from core.keys import Keys
from core.redis_conn import Redis

# reply kind -> the counter it bumps
KIND_COUNTERS = {"answer": "answered", "decline": "declined", "handoff": "escalated"}
COUNTERS = ("answered", "declined", "escalated", "helpful", "unhelpful", "rate_limited")

# KEYS: feedback.  ARGV: field, rating (1 or -1), ttl_s.
# Returns the previous rating (0 if none); the caller moves the counters by the difference.
_RATE = """
local previous = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local rating = tonumber(ARGV[2])
if previous == rating then return previous end
redis.call('HSET', KEYS[1], ARGV[1], rating)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return previous
"""


class Feedback:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        # The rating lives in its conversation's slot and the counters in the workspace's:
        # the script decides (atomically) and the counters follow, so that it stays legal
        # on Redis Cluster. A crash between the two leaves a counter one off, never a rating.
        self._rate = redis.register_script(_RATE)

    async def record_reply(self, reply: Reply) -> None:
        """Count a committed reply and remember what it was, for ratings and stats."""
        counter = KIND_COUNTERS.get(reply.kind)
        if counter is None:
            return
        conv = reply.conversation
        record: dict[str, Any] = {
            "kind": reply.kind,
            "sources": reply.meta.get("sources", []),
            "at": time.time(),
        }
        if reply.meta.get("generated"):
            # Where the model's own words are in the reply's text (the history holds the
            # text, scrubbed there when a user is forgotten), for `chatbot watermark detect
            # --reply`: quoted passages and fixed frames are not the model's.
            record["generated"] = [[int(a), int(b)] for a, b in reply.meta["generated"]]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.answers(conv), reply.reply_id, json.dumps(record))
            pipe.expire(self.keys.answers(conv), self.ttl_s)
            pipe.hincrby(self.keys.stats(conv.platform, conv.workspace), counter, 1)
            await pipe.execute()

    async def rate(self, reply_id: str, user_id: str, helpful: bool) -> bool:
        """Store a user's rating of an answer; False when the answer is unknown (expired)."""
        try:
            conv = ReplyId.parse(reply_id).conversation
        except ValueError:
            return False
        if not await self.redis.hexists(self.keys.answers(conv), reply_id):
            return False
        rating = 1 if helpful else -1
        previous = int(
            await self._rate(
                keys=[self.keys.feedback(conv)], args=[f"{reply_id}|{user_id}", rating, self.ttl_s]
            )
        )
        if previous != rating:
            counters = {1: "helpful", -1: "unhelpful"}
            stats = self.keys.stats(conv.platform, conv.workspace)
            async with self.redis.pipeline(transaction=True) as pipe:  # one key
                if previous in counters:
                    pipe.hincrby(stats, counters[previous], -1)
                pipe.hincrby(stats, counters[rating], 1)
                await pipe.execute()
        return True

    async def record(self, reply_id: str) -> dict[str, Any] | None:
        """What was recorded of a reply (None: no such answer, or it expired)."""
        try:
            conv = ReplyId.parse(reply_id).conversation
        except ValueError:
            return None
        raw = await self.redis.hget(self.keys.answers(conv), reply_id)
        if raw is None:
            return None
        found: dict[str, Any] = json.loads(raw)
        return found

    async def ratings(self, conversation: ConversationKey) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.feedback(conversation))
        return {str(k): int(v) for k, v in raw.items()}


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]

    def rate(self, part: str, whole: int) -> float | None:
        return self.counts.get(part, 0) / whole if whole else None

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        replies = c["answered"] + c["declined"] + c["escalated"]
        rated = c["helpful"] + c["unhelpful"]
        return {
            **c,
            "replies": replies,
            "answered_rate": self.rate("answered", replies),
            "escalated_rate": self.rate("escalated", replies),
            "helpful_rate": self.rate("helpful", rated),
        }


async def read_stats(redis: Redis, keys: Keys, platform: str = "", workspace: str = "") -> Stats:
    """Counters summed over the workspaces that match (all when both are empty)."""
    totals = dict.fromkeys(COUNTERS, 0)
    async for key in redis.scan_iter(match=keys.stats_pattern):
        found = keys.workspace_of_stats(str(key))
        if found is None:
            continue
        key_platform, key_workspace = found
        if (platform and key_platform != platform) or (workspace and key_workspace != workspace):
            continue
        for name, value in (await redis.hgetall(key)).items():
            if name in totals:
                totals[name] += int(value)
    return Stats(totals)
