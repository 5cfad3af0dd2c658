"""Messages written while the Discord adapter was away.

Discord replays missed events only to a session it can resume; a new process (a restart, a
rollout, a crash) starts a new session and never hears of what was written meanwhile. So
the adapter records, per channel it has stored a message from, the newest such message
(`ChannelMarks`); when a new session is ready it reads each recently active channel's
history after that message and hands what it finds to the adapter like any new message.
The inbound dedupe (by message id) drops what was stored already, so reading too much is
harmless; reading too little is what this prevents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot.discord.posting import PLATFORM
from core.keys import Keys
from core.redis_conn import Redis

log = logging.getLogger(__name__)

CATCH_UP_WINDOW_S = 3600.0  # channels whose newest stored message is older are not read
CATCH_UP_MAX_CHANNELS = 50  # the most recently active ones
CATCH_UP_MAX_MESSAGES = 100  # per channel
DISCORD_EPOCH_MS = 1_420_070_400_000

# Snowflakes exceed a Lua number's exact range: compared as decimal strings (length first).
_RECORD_NEWER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if (not old) or #ARGV[2] > #old or (#ARGV[2] == #old and ARGV[2] > old) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""


def snowflake_time_s(snowflake: str) -> float:
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000.0


class ChannelMarks:
    """Channel id -> the newest message the adapter stored from it, in one Redis hash."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.channel_marks(PLATFORM)
        self._record: Any = redis.register_script(_RECORD_NEWER)

    async def record(self, channel_id: str, message_id: str) -> None:
        await self._record(keys=[self.key], args=[channel_id, message_id])

    async def recent(self, now_s: float) -> list[tuple[str, str]]:
        """(channel, newest stored message) of the channels active within the window, the
        most recent first; older marks are dropped."""
        stored: Any = await self.redis.hgetall(self.key)
        marks = {str(channel): str(message) for channel, message in stored.items()}
        stale = {c for c, m in marks.items() if now_s - snowflake_time_s(m) > CATCH_UP_WINDOW_S}
        if stale:
            await self.redis.hdel(self.key, *stale)
        fresh = [(c, m) for c, m in marks.items() if c not in stale]
        fresh.sort(key=lambda mark: int(mark[1]), reverse=True)
        return fresh[:CATCH_UP_MAX_CHANNELS]

    async def forget(self, channel_id: str) -> None:
        await self.redis.hdel(self.key, channel_id)


async def catch_up(
    client: discord.Client,
    marks: ChannelMarks,
    handle: Callable[[discord.Message], Awaitable[None]],
) -> int:
    """Hand every message written after the marks to `handle`, oldest first, channel by
    channel; returns how many were handed over. A channel that is gone or closed to the bot
    is forgotten; any other failure is logged and the next channel read."""
    handed = 0
    for channel_id, after in await marks.recent(time.time()):
        try:
            channel: Any = client.get_channel(int(channel_id)) or await client.fetch_channel(
                int(channel_id)
            )
            async for message in channel.history(
                limit=CATCH_UP_MAX_MESSAGES, after=discord.Object(id=int(after)), oldest_first=True
            ):
                await handle(message)
                handed += 1
        except (discord.NotFound, discord.Forbidden) as exc:
            log.warning(
                "Discord channel %s is no longer readable (%s): not caught up", channel_id, exc
            )
            await marks.forget(channel_id)
        except discord.HTTPException as exc:
            log.warning("could not read Discord channel %s to catch up: %s", channel_id, exc)
    if handed:
        log.info("caught up with %d Discord message(s) written while disconnected", handed)
    return handed
