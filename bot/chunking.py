"""Splitting a long reply into messages a platform accepts, never inside a code block.

Splits prefer paragraph boundaries, then line boundaries, then spaces. A code block longer
than one message is closed at the end of a part and reopened (same fence and language) at
the start of the next, so every part renders as valid Markdown on its own.

It terminates on every input and no part is longer than the limit: a line longer than a
part is cut, and the reopening fence line is kept short (the fence and the language's
first word), so a part always has room for text after it.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")
MAX_MARKER_CHARS = 10  # a longer run of backticks is treated as text, not as a fence
MAX_LANGUAGE_CHARS = 20
MIN_LIMIT = 20


def _opening(line: str) -> str | None:
    """The short reopening line of the code block `line` opens, if it is a fence."""
    match = _FENCE.match(line)
    if not match or len(match.group(1)) > MAX_MARKER_CHARS:
        return None
    words = match.group(2).split()
    language = words[0][:MAX_LANGUAGE_CHARS] if words else ""
    return match.group(1) + language


def _marker(opening: str) -> str:
    match = _FENCE.match(opening)
    return match.group(1) if match else "```"


def _fence_after(opening: str | None, line: str) -> str | None:
    """The code block open after `line`, given the one open before it."""
    if opening is None:
        return _opening(line)
    match = _FENCE.match(line)
    if match and match.group(1) == _marker(opening) and not match.group(2).strip():
        return None
    return opening


def split_message(text: str, limit: int) -> list[str]:
    """Parts of at most `limit` characters that together say `text`."""
    if limit < MIN_LIMIT:
        raise ValueError("limit too small to split sensibly")
    if len(text) <= limit:
        return [text]
    return _Splitter(limit).split(text)


class _Splitter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.lines: list[str] = []  # the part being built
        self.fence: str | None = None  # the code block open after `lines`
        self.fresh = 0  # how many lines a new part starts with (its reopening fence)

    def split(self, text: str) -> list[str]:
        pending = text.split("\n")
        index = 0
        while index < len(pending):
            line = pending[index]
            after = _fence_after(self.fence, line)
            if self._size([*self.lines, line], after) <= self.limit:
                self.lines.append(line)
                self.fence = after
                index += 1
                # Prefer to end a part at a paragraph break once it is reasonably full.
                if (
                    not line.strip()
                    and after is None
                    and self._size(self.lines, None) > (self.limit * 0.6)
                ):
                    self._flush()
            elif len(self.lines) > self.fresh:
                self._flush()
            else:
                rest = self._cut(line)
                if rest:
                    pending[index] = rest
                else:
                    index += 1
        if len(self.lines) > self.fresh:
            self._flush()
        return self.parts

    def _size(self, lines: list[str], fence: str | None) -> int:
        closing = len("\n" + _marker(fence)) if fence else 0
        return len("\n".join(lines)) + closing

    def _cut(self, line: str) -> str:
        """A line too long for any part: put as much as fits (at a space if one is near)
        in this part, flush it, and return the rest of the line."""
        room = self.limit - len("\n".join([*self.lines, ""])) - (MAX_MARKER_CHARS + 1)
        if room < 1:  # no room beside the reopening fence: start without it
            self.lines, self.fence, self.fresh = [], None, 0
            room = self.limit - (MAX_MARKER_CHARS + 1)
        cut = line.rfind(" ", 0, room)
        cut = cut if cut > room // 2 else room
        piece = line[:cut].rstrip()
        self.lines.append(piece)
        self.fence = _fence_after(self.fence, piece)
        self._flush()
        return line[cut:].lstrip(" ")

    def _flush(self) -> None:
        body = "\n".join(self.lines).rstrip("\n")
        if self.fence:
            body += "\n" + _marker(self.fence)
        if body.strip():
            self.parts.append(body)
        # The next part reopens the block; its first line is the fence, so no block is
        # open before it.
        reopen = self.fence
        self.lines = [reopen] if reopen else []
        self.fresh = len(self.lines)
