"""The model writes Markdown; Slack renders mrkdwn. Convert, leaving code untouched."""

from __future__ import annotations

import re

_CODE = re.compile(r"(```.*?```|`[^`\n]+`)", re.DOTALL)
_FENCE_LANGUAGE = re.compile(r"^```[A-Za-z0-9_+#.-]+\n")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_BULLET = re.compile(r"^(\s*)[-*+]\s+", re.MULTILINE)
# A user, channel or group mention in the model's output must not ping anyone.
_SPECIAL_MENTION = re.compile(r"<!(everyone|channel|here)[^>]*>|@(everyone|channel|here)\b")

BOLD_MARK = "\x00B\x00"


def escape(text: str) -> str:
    """Text shown as itself in mrkdwn: no link, mention or ping can come out of it."""
    return _escape(text)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _convert_prose(text: str) -> str:
    text = _SPECIAL_MENTION.sub(lambda m: m.group(1) or m.group(2), text)
    links: list[str] = []

    def keep_link(match: re.Match[str]) -> str:
        label, url = _escape(match.group(1)), match.group(2)
        if any(c in url for c in "<>|"):  # it would close the link and inject markup
            links.append(f"{label} ({_escape(url)})")
        else:
            links.append(f"<{url.replace('&', '&amp;')}|{label}>")
        return f"\x00L{len(links) - 1}\x00"

    text = _LINK.sub(keep_link, text)
    text = _escape(text)
    text = _HEADING.sub(lambda m: f"{BOLD_MARK}{m.group(1)}{BOLD_MARK}", text)
    text = _BOLD.sub(lambda m: f"{BOLD_MARK}{m.group(2)}{BOLD_MARK}", text)
    text = _ITALIC.sub(r"_\1_", text)
    text = _STRIKE.sub(r"~\1~", text)
    text = _BULLET.sub(r"\1• ", text)
    text = text.replace(BOLD_MARK, "*")
    return re.sub(r"\x00L(\d+)\x00", lambda m: links[int(m.group(1))], text)


def _convert_code(code: str) -> str:
    if code.startswith("```"):
        code = _FENCE_LANGUAGE.sub("```\n", code)  # Slack would show the language as code
    return _escape(code)


def markdown_to_mrkdwn(text: str) -> str:
    pieces = _CODE.split(text)
    return "".join(
        _convert_code(piece) if index % 2 else _convert_prose(piece)
        for index, piece in enumerate(pieces)
    )
