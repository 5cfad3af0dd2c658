"""Splitting a long reply into messages a platform accepts, never inside a code block.

Splits prefer paragraph boundaries, then line boundaries, then spaces. A code block longer
than one message is closed at the end of a part and reopened (same fence and language) at
the start of the next, so every part renders as valid Markdown on its own.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")


def _fence_marker(opening: str) -> str:
    match = _FENCE.match(opening)
    return match.group(1) if match else "```"


def _open_fence_after(lines: list[str], opening: str | None) -> str | None:
    """The opening line of the code block still open after `lines` (None if none is),
    given the one open before them."""
    for line in lines:
        match = _FENCE.match(line)
        if not match:
            continue
        if opening is None:
            opening = line.strip()
        elif match.group(1) == _fence_marker(opening) and not match.group(2).strip():
            opening = None
    return opening


def split_message(text: str, limit: int) -> list[str]:
    """Parts of at most `limit` characters that together say `text`."""
    if limit < 20:
        raise ValueError("limit too small to split sensibly")
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    lines = text.split("\n")
    current: list[str] = []
    fence: str | None = None  # the block open before the first line of `current`
    reopen = ""

    def size(candidate: list[str], open_fence: str | None) -> int:
        closing = len("\n" + _fence_marker(open_fence)) if open_fence else 0
        return len("\n".join(candidate)) + closing

    def flush() -> None:
        nonlocal current, fence, reopen
        body = "\n".join(current).rstrip("\n")
        open_after = _open_fence_after(current, fence)
        if open_after:
            body += "\n" + _fence_marker(open_after)
        if body.strip():
            parts.append(body)
        # The next part starts with the reopening fence line itself, so no block is open
        # before its first line.
        fence = None
        reopen = open_after or ""
        current = [reopen] if reopen else []

    index = 0
    while index < len(lines):
        line = lines[index]
        candidate = [*current, line]
        open_after = _open_fence_after(candidate, fence)
        if size(candidate, open_after) <= limit:
            current = candidate
            index += 1
            # Prefer to end a part at a paragraph break once it is reasonably full.
            if not line.strip() and open_after is None and size(current, None) > limit * 0.6:
                flush()
            continue
        if [c for c in current if c != reopen]:
            flush()
            continue
        # A single line longer than a part: cut it at a space (or hard) and go on.
        room = limit - size(current, _open_fence_after([*current, ""], fence)) - 1
        cut = line.rfind(" ", 0, room)
        cut = cut if cut > room // 2 else room
        lines[index] = line[cut:].lstrip(" ")
        current = [*current, line[:cut].rstrip()]
        flush()
    if [c for c in current if c != reopen]:
        flush()
    return parts
