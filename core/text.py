"""Cleaning what users type before it is stored or shown to the model."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# C0/C1 control characters except tab and newline, plus DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Invisible characters that hide or reorder text: zero-width spaces and joiners (not the
# emoji joiner U+200D), bidirectional controls, the BOM, and Unicode tag characters.
_INVISIBLE = re.compile(
    "[\u200b\u200c\u200e\u200f\u061c\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
    "\U000e0000-\U000e007f]"
)
MAX_NAME_CHARS = 80
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
    text = unicodedata.normalize("NFC", _INVISIBLE.sub("", _CONTROL.sub("", text)))
    text = _BLANK_LINES.sub("\n\n", text).strip()
    truncated = len(text) > max_chars
    if truncated:
        text = text[:max_chars].rstrip() + TRUNCATION_NOTE
    return CleanText(text=text, truncated=truncated, original_chars=original_chars)


def clean_name(raw: str) -> str:
    """A display name as the bot may store and show it: one line, visible, bounded."""
    text = _INVISIBLE.sub("", _CONTROL.sub(" ", _SURROGATE.sub("", raw)))
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text[:MAX_NAME_CHARS] or "someone"
