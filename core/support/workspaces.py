"""Per-workspace settings (a Slack workspace, a Discord guild), stored in Redis.

Each field overrides the process-wide setting of the same meaning for that workspace only:
the persona, the knowledge base, the support contact that handoffs notify, the channels
the bot may answer in (direct messages are always answered), and a disclosure line under
every reply for teams whose policy asks for one. Managed with
`chatbot workspace set|show|unset|list`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import SettingsError
from core.keys import Keys
from core.knowledge.documents import check_kb_name
from core.redis_conn import Redis
from core.settings import Settings

# field name -> what it overrides, for `chatbot workspace` help and errors
FIELDS = {
    "persona": "system prompt / persona (CHATBOT_PERSONA)",
    "kb": "knowledge base name (CHATBOT_KB)",
    "support_channel": "channel id that handoffs notify (CHATBOT_SUPPORT_CHANNEL)",
    "support_mention": (
        "who handoffs mention: a Slack user group (S…) or user (U…), a Discord role or user id "
        "(CHATBOT_SUPPORT_MENTION)"
    ),
    "channels": "comma-separated channel ids the bot may answer in (empty: all)",
    "disclosure": (
        'a line under every reply to customers, e.g. "Answered by an AI assistant" (empty: none)'
    ),
}


@dataclass(frozen=True)
class WorkspaceConfig:
    persona: str
    kb: str
    support_channel: str
    support_mention: str
    channels: frozenset[str]
    disclosure: str = ""

    served: bool = True  # False: CHATBOT_WORKSPACES=listed and `chatbot workspace` lacks it

    def allows(self, channel: str, *, direct: bool) -> bool:
        if not self.served:
            return False
        return direct or not self.channels or channel in self.channels


def validate(name: str, value: str) -> str:
    if name not in FIELDS:
        raise SettingsError(f"unknown workspace setting {name!r}; known: {', '.join(FIELDS)}")
    value = value.strip()
    if name == "kb" and value:
        check_kb_name(value)
    if name == "channels":
        value = ",".join(c.strip() for c in value.split(",") if c.strip())
    if name == "persona" and not value:
        raise SettingsError("a workspace persona cannot be empty: unset it instead")
    return value


class Workspaces:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings

    async def overrides(self, platform: str, workspace: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.workspace(platform, workspace))
        return {str(k): str(v) for k, v in raw.items()}

    async def config(self, platform: str, workspace: str) -> WorkspaceConfig:
        """The effective settings: the workspace's overrides over the process settings."""
        s = self.settings
        o = await self.overrides(platform, workspace)
        channels = frozenset(c for c in o.get("channels", "").split(",") if c)
        return WorkspaceConfig(
            persona=o.get("persona") or s.persona,
            kb=o.get("kb") or s.kb,
            support_channel=o.get("support_channel", s.support_channel),
            support_mention=o.get("support_mention", s.support_mention),
            channels=channels,
            disclosure=o.get("disclosure", ""),
            served=s.workspaces == "open" or bool(o),
        )

    async def set(self, platform: str, workspace: str, values: dict[str, str]) -> None:
        clean: dict[Any, Any] = {n: validate(n, v) for n, v in values.items()}
        await self.redis.hset(self.keys.workspace(platform, workspace), mapping=clean)

    async def unset(self, platform: str, workspace: str, names: list[str]) -> None:
        for name in names:
            validate(name, "x")
        if names:
            await self.redis.hdel(self.keys.workspace(platform, workspace), *names)

    async def all(self) -> dict[str, dict[str, str]]:
        """`platform:workspace` -> overrides, for every configured workspace."""
        found = {}
        async for key in self.redis.scan_iter(match=self.keys.workspace_pattern):
            name = self.keys.workspace_of_settings(str(key))
            if name is None:
                continue
            found[name] = {str(k): str(v) for k, v in (await self.redis.hgetall(key)).items()}
        return dict(sorted(found.items()))
