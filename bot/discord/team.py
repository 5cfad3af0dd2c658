"""Who is the support team in a Discord guild: holders of its support role (or the support
user); with neither set, those who can see its support channel. Discord sends a member's
roles with every message and interaction, so no lookup (and no cache) is needed."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.discord.posting import PLATFORM
from core.support.workspaces import Workspaces


async def is_agent(
    workspaces: Workspaces, client: discord.Client, user: Any, guild_id: str | None
) -> bool:
    if guild_id is None:  # a DM: nobody there is the support team
        return False
    config = await workspaces.config(PLATFORM, guild_id)
    wanted = re.sub(r"\D", "", config.support_mention)
    if wanted:
        role_ids = {str(r.id) for r in getattr(user, "roles", [])}
        role_ids |= {str(r) for r in getattr(user, "_roles", [])}  # roles not cached yet
        return str(user.id) == wanted or wanted in role_ids
    if config.support_channel.isdigit() and isinstance(user, discord.Member):
        channel = client.get_channel(int(config.support_channel))
        if isinstance(channel, discord.abc.GuildChannel):
            return bool(channel.permissions_for(user).view_channel)
    return False
