"""How log lines look: `CHATBOT_LOG_FORMAT=text` (the default) or `json`.

JSON is one object per line, for log collectors: `time` (UTC, ISO 8601), `level`, `logger`,
`message`, the `conversation`, `jobs` and `reply` being handled when the line was written
(`core.context`), and `exception` (the traceback) when there is one. The personal-data
filter (`core.pii`) runs on the handler before the formatter, so the message and the
traceback written here are the masked ones.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from core.context import current

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = current()
        if context is not None:
            if context.conversation:
                entry["conversation"] = context.conversation
            if context.jobs:
                entry["jobs"] = list(context.jobs)
            if context.reply:
                entry["reply"] = context.reply
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False)


def log_formatter(log_format: str) -> logging.Formatter:
    """The formatter for `CHATBOT_LOG_FORMAT` (validated by the settings)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
