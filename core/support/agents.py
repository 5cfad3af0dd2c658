"""Who is the support team: only its members are recorded as human agents, may hand a
conversation back to the bot, or reset someone else's conversation.

The team is the workspace's support user group (Slack) or role (Discord), or the support
user; with neither, the members of the support channel. Finding them takes a platform
call, which the adapter makes (`lookup`); the answer is cached in Redis for a short while,
so that a change of membership counts within `TEAM_TTL_S`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from core.keys import Keys
from core.redis_conn import TRANSIENT_ERRORS, Redis

log = logging.getLogger(__name__)

TEAM_TTL_S = 60
FAILED_LOOKUP_TTL_S = 10
ONLY_AGENTS = "Only our support team can do that."

Lookup = Callable[[], Awaitable[set[str]]]


class SupportTeam:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def members(self, platform: str, workspace: str, lookup: Lookup) -> set[str]:
        key = self.keys.support_team(platform, workspace)
        cached = await self.redis.get(key)
        if cached is not None:
            return {str(u) for u in json.loads(cached)}
        ttl_s = TEAM_TTL_S
        try:
            found = await lookup()
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:  # the platform's answer; nobody counts as an agent then
            log.warning("could not look up the support team of %s %s: %r", platform, workspace, exc)
            found, ttl_s = set(), FAILED_LOOKUP_TTL_S
        await self.redis.set(key, json.dumps(sorted(found)), ex=ttl_s)
        return found

    async def includes(self, platform: str, workspace: str, user_id: str, lookup: Lookup) -> bool:
        return user_id in await self.members(platform, workspace, lookup)
