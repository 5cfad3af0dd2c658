"""Whether a new message may be queued: per-user rate limits and back-pressure.

A user past `CHATBOT_USER_RATE` is told so once per window and nothing is queued (a GCRA,
the generic cell rate algorithm, in one Lua script on the user's key: smooth, with a burst
of the rate's count). When the job stream holds more than `CHATBOT_MAX_QUEUED_JOBS`
entries, new messages get a polite "very busy" instead of joining a queue no one will
reach soon; nothing already queued is ever dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.keys import Keys
from core.redis_conn import Redis

log = logging.getLogger(__name__)

RATE_LIMITED_TEXT = (
    "You're sending messages faster than I can answer them. Please wait a little, then "
    "send your question again."
)
BUSY_TEXT = (
    "We're very busy right now and couldn't take your message. Please try again in a minute."
)

# KEYS: the user's theoretical arrival time, their notice marker.  ARGV: interval ms,
# burst.  Returns {allowed, notify}: notify is 1 for the first refusal of a window.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local tau = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
if now < tat - tau then
  local wait = math.max(math.ceil(tat - tau - now), 1)
  local first = redis.call('SET', KEYS[2], '1', 'NX', 'PX', wait)
  if first then return {0, 1} end
  return {0, 0}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil(next_tat - now) + 1)
return {1, 0}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    notify: bool = False  # tell the user (once per window)


class RateLimiter:
    def __init__(self, redis: Redis, keys: Keys, count: int, period_s: float) -> None:
        self.keys = keys
        self.interval_ms = max(int(period_s * 1000 / count), 1)
        self.burst = count
        self._script = redis.register_script(_GCRA)

    async def check(self, platform: str, user_id: str) -> Decision:
        allowed, notify = await self._script(
            keys=[self.keys.rate(platform, user_id), self.keys.rate_notice(platform, user_id)],
            args=[self.interval_ms, self.burst],
        )
        return Decision(bool(allowed), bool(notify))
