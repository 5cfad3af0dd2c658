"""The Slack adapter: `adapter` (events in), `posting` (replies out), `format` (mrkdwn)."""

from bot.slack.adapter import RESET_DONE, SlackAdapter
from bot.slack.posting import MESSAGE_LIMIT, WORKING_TEXT

__all__ = ["MESSAGE_LIMIT", "RESET_DONE", "WORKING_TEXT", "SlackAdapter"]
