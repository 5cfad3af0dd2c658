"""The Slack adapter: `adapter` (events in), `commands` (slash commands and buttons),
`posting` (replies out), `requests` (refusing malformed requests), `format` (mrkdwn)."""

from bot.slack.adapter import SlackAdapter
from bot.slack.commands import RESET_DONE
from bot.slack.posting import MESSAGE_LIMIT, WORKING_TEXT

__all__ = ["MESSAGE_LIMIT", "RESET_DONE", "WORKING_TEXT", "SlackAdapter"]
