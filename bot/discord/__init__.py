"""The Discord adapter: `adapter` (gateway events in), `commands` (slash commands, buttons,
reactions), `posting` (replies out)."""

from bot.discord.adapter import INTENT_HELP, DiscordAdapter, invite_url
from bot.discord.commands import RELEASE_DONE, RESET_DONE
from bot.discord.posting import jump_link

__all__ = ["INTENT_HELP", "RELEASE_DONE", "RESET_DONE", "DiscordAdapter", "invite_url", "jump_link"]
