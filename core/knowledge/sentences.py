"""Splitting help-centre text into sentences, the unit an answer is made of.

Punctuation followed by a space and a capital (or a digit, quote or bracket) ends a
sentence, except after the abbreviations a help centre uses ("e.g.", "p.m.", "No.", "St.").
Dots inside a token (prices, times, links, e-mail addresses) never split. Each line of a
list is its own sentence, and so is a line that ends without punctuation (a heading-like
line such as "Opening hours:").
"""

from __future__ import annotations

import re

_ABBREVIATION_TEXT = """
    e.g i.e etc vs approx incl excl no nos st dr mr mrs ms jr sr inc ltd co corp dept
    est fig min max mon tue wed thu fri sat sun jan feb mar apr jun jul aug sep sept oct
    nov dec a.m p.m u.s u.k a.k.a ft oz lb lbs"""
_ABBREVIATIONS = frozenset(_ABBREVIATION_TEXT.split())
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,3}[.)])\s+")
_LIST_MARKER = re.compile(r"\d{1,3}[.)]")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def _ends_with_abbreviation(text: str, following: str) -> bool:
    last = text.rstrip().rsplit(None, 1)[-1] if text.strip() else ""
    word = last.rstrip(".").lstrip("(\"'").lower().rsplit("-", 1)[-1]
    if word in ("no", "nos"):  # "No. 5" is a number; "No. You need…" an answer
        return following[:1].isdigit()
    return word in _ABBREVIATIONS or bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]?", word + "."))


def _split_line(line: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(line):
        candidate = line[start : match.start()]
        if _ends_with_abbreviation(candidate, line[match.end() :]) or _LIST_MARKER.fullmatch(
            candidate.strip()
        ):
            continue
        if candidate.strip():
            sentences.append(candidate.strip())
        start = match.end()
    tail = line[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, in order, each stripped; list markers are kept."""
    sentences: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if pending:
                sentences.extend(_split_line(pending))
                pending = ""
            continue
        if _LIST_ITEM.match(line):
            if pending:
                sentences.extend(_split_line(pending))
            pending = line
            continue
        pending = f"{pending} {line}" if pending else line
    if pending:
        sentences.extend(_split_line(pending))
    return sentences
