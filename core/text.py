"""Cleaning what users type before it is stored or shown to the model."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# C0/C1 control characters except tab and newline, plus DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BLANK_LINES = re.compile(r"\n{3,}")

TRUNCATION_NOTE = " […message shortened]"
EMPTY_MESSAGE_REPLY = "It looks like your message was empty. What can I help you with?"


@dataclass(frozen=True)
class CleanText:
    text: str
    truncated: bool
    original_chars: int


def clean_user_text(raw: str | bytes, max_chars: int) -> CleanText:
    """Decode, normalise and bound a user's message. The result may be empty."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    original_chars = len(raw)
    text = _SURROGATE.sub("\ufffd", raw)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    text = _BLANK_LINES.sub("\n\n", text).strip()
    truncated = len(text) > max_chars
    if truncated:
        text = text[:max_chars].rstrip() + TRUNCATION_NOTE
    return CleanText(text=text, truncated=truncated, original_chars=original_chars)
