"""Masking personal data (e-mail addresses, phone numbers, card numbers) in log output.

`mask_pii` rewrites a string; `PiiMaskingFilter` applies it to every log record that passes
through it; `install_log_masking` puts one such filter on each handler of a logger.

Why handlers and not loggers: a filter attached to a *logger* only sees records created on
that very logger. Records logged on a child logger (``logging.getLogger("chatbot.worker")``)
propagate up to the parent's *handlers* without ever consulting the parent logger's filters,
so a filter on the root logger would let almost everything through unmasked. A filter on a
handler sees every record that the handler is about to write, wherever it was logged.
Consequently handlers added after `install_log_masking` ran are not covered: call it again
once logging is fully configured (it is idempotent).

The filter mutates the record (the rendered, masked message replaces ``msg``/``args``), so
every handler that formats the record after it also sees the masked text.

What is masked, and what is deliberately left alone:

* e-mail addresses -> ``[email]``;
* payment-card numbers -> ``[card]``: 13-19 digits, either one plain run of 13-16 digits
  or groups separated by single spaces/dashes where the first group has 4 digits and every
  group 3-6 (4-4-4-4, 4-6-5, 4-4-4-4-3, ...). The number must start with 2-6 (the major
  networks: Mastercard, Amex, Diners, Visa, Discover, UnionPay, JCB) and pass the Luhn
  check. Plain runs of 17 or more digits (Discord snowflakes) are never cards, and epoch
  milliseconds (starting with 1) are not either. Trailing numbers (an expiry, a CVV) do not
  hide a card: ``4111 1111 1111 1111 123`` becomes ``[card] 123``;
* phone numbers -> ``[phone]``: international (``+1 503-555-0142``, ``+44 20 7946 0958``,
  ``0044 20 7946 0958``, ``+15035550142``), an area code in parentheses
  (``(503) 555-0142``), North-American ``503.555.0142`` / ``503-555-0142`` / ``555-0142``
  and national numbers with a trunk zero (``020 7946 0958``, ``01 23 45 67 89``); 7-15
  digits in all. Three space-separated numbers shaped 3-3-4 (``100 200 3000``) are taken
  for a phone number too: that is the price of catching ``503 555 0142``.

Numbers glued to identifiers or to other numbers through ``.``/``-``/``:``/``/`` are not
touched, so Slack/Discord ids, timestamps (``1700000000.000100``), dates, times, versions,
IP addresses and ports, UUIDs, Redis stream ids and order numbers (``HP-10482``) survive.
"""

from __future__ import annotations

import logging
import re

__all__ = ["PiiMaskingFilter", "install_log_masking", "mask_pii"]

EMAIL_MASK = "[email]"
PHONE_MASK = "[phone]"
CARD_MASK = "[card]"

# The lookbehind pins the start to the beginning of a run of local-part characters, so a long
# word without an "@" costs one pass, not one pass per character.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[\w-]+\.)+[^\W\d_]{2,}(?![\w-])")

# Where a number may start: not inside a word or number, not right after "word." / "word-"
# (versions, UUID groups, order numbers) and not right after "digit:" / "digit/" (times,
# dates, host:port, URL paths).
_START = r"(?<![\w+])(?<!\w[.-])(?<!\d[:/])"
# Where a number may end: not followed by a word character, nor by ".", ":", "/" or "-" and
# then a word character (a decimal part, a time, a UUID group, a path).
_END = r"(?!\w|[.:/-]\w)"

# A run of digit groups separated by single spaces or dashes, holding at least 13 digits.
# Card numbers are then looked for inside the run (see `_mask_card_run`), so that a card
# followed by an expiry month or a CVV ("4111 1111 1111 1111 123") is still found.
_CARD_RUN = re.compile(
    _START + r"(?<!\d )(?=(?:[ -]?\d){13})\d+(?:[ -]\d+)*" + _END,
    re.ASCII,
)
_DIGIT_GROUP = re.compile(r"\d+", re.ASCII)

_PHONE = re.compile(
    _START
    + r"""
    (?:
        (?:\+|00)[1-9]\d{0,14}                              # country code, maybe more digits
        (?:(?:[ .-]?\(\d{1,5}\)[ .-]?|[ .-])\d{1,14})*      # groups, "(0)" or "(503)" allowed
      | \(\d{1,5}\)[ .-]?\d{2,8}(?:[ .-]\d{2,8}){0,3}       # (503) 555-0142, (020) 7946 0958
      | (?:1[ .-])?\d{3}[ .-]\d{3}[ .-]\d{4}                # 503.555.0142, 1-503-555-0142
      | \d{3}-\d{4}                                         # 555-0142
      | 0\d{1,4}(?:[ .-]\d{2,8}){1,4}                       # 020 7946 0958, 01 23 45 67 89
    )
    """
    + _END,
    re.ASCII | re.VERBOSE,
)
_NON_DIGITS = re.compile(r"\D+", re.ASCII)
# Day-month-year dates that the trunk-zero phone pattern would otherwise take: 01-02-2026.
_DMY_DATE = re.compile(r"\d{1,2}([.-])\d{1,2}\1\d{4}", re.ASCII)
_ANY_DIGIT = re.compile(r"\d", re.ASCII)

_MIN_PHONE_DIGITS = 7
_MAX_PHONE_DIGITS = 15
_MIN_CARD_DIGITS = 13
_MAX_CARD_DIGITS = 19
_MAX_PLAIN_CARD_DIGITS = 16  # a plain run of 17+ digits is an id (a Discord snowflake)
_CARD_FIRST_DIGITS = frozenset("23456")


def mask_pii(text: str) -> str:
    """Return `text` with e-mail addresses, card numbers and phone numbers replaced."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_MASK, text)
    if _ANY_DIGIT.search(text) is not None:
        text = _CARD_RUN.sub(_mask_card_run, text)
        text = _PHONE.sub(_mask_phone, text)
    return text


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_card_run(match: re.Match[str]) -> str:
    """Mask the card numbers inside a run of digit groups, scanning left to right and taking
    at each group the longest card number that starts there."""
    run = match.group()
    spans = [m.span() for m in _DIGIT_GROUP.finditer(run)]
    pieces: list[str] = []
    copied = 0  # run[:copied] is already in pieces
    first = 0
    while first < len(spans):
        last = _card_end(run, spans, first)
        if last is None:
            first += 1
            continue
        pieces.append(run[copied : spans[first][0]])
        pieces.append(CARD_MASK)
        copied = spans[last][1]
        first = last + 1
    if not pieces:
        return run
    pieces.append(run[copied:])
    return "".join(pieces)


def _card_end(run: str, spans: list[tuple[int, int]], first: int) -> int | None:
    """The index of the last group of the longest card number starting at group `first`."""
    start, end = spans[first]
    if run[start] not in _CARD_FIRST_DIGITS:
        return None
    size = end - start
    if _MIN_CARD_DIGITS <= size <= _MAX_PLAIN_CARD_DIGITS:
        # A plain run is a card on its own, never the first group of a longer number.
        return first if _luhn_ok(run[start:end]) else None
    if size != 4:
        return None
    digits = run[start:end]
    found: int | None = None
    for last in range(first + 1, len(spans)):
        group_start, group_end = spans[last]
        if not 3 <= group_end - group_start <= 6:
            break
        digits += run[group_start:group_end]
        if len(digits) > _MAX_CARD_DIGITS:
            break
        if len(digits) >= _MIN_CARD_DIGITS and _luhn_ok(digits):
            found = last
    return found


def _mask_phone(match: re.Match[str]) -> str:
    candidate = match.group()
    digits = _NON_DIGITS.sub("", candidate)
    if candidate.startswith("00"):
        digits = digits[2:]
    if not _MIN_PHONE_DIGITS <= len(digits) <= _MAX_PHONE_DIGITS:
        return candidate
    if _DMY_DATE.fullmatch(candidate):
        return candidate
    return PHONE_MASK


# Renders a traceback that no formatter has rendered yet, so that it can be masked before a
# handler writes it (`logging.Formatter.format` reuses `record.exc_text` when it is set).
_TRACEBACK_FORMATTER = logging.Formatter()


class PiiMaskingFilter(logging.Filter):
    """Mask personal data in a record's message, traceback and stack; never drops a record.

    Attach it to handlers (see `install_log_masking`), not to loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = mask_pii(record.getMessage())
        except Exception:
            return True  # a malformed record: leave it for the handler to report
        record.msg = message
        record.args = None
        try:
            if record.exc_info and not record.exc_text:
                record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = mask_pii(record.exc_text)
            if record.stack_info:
                record.stack_info = mask_pii(record.stack_info)
        except Exception:
            pass
        return True


def install_log_masking(logger: logging.Logger | None = None) -> None:
    """Add one `PiiMaskingFilter` to every handler of `logger` (the root logger by default).

    Idempotent: a handler that already has a `PiiMaskingFilter` does not get a second one.
    Only handlers present now are covered.
    """
    target = logging.getLogger() if logger is None else logger
    for handler in target.handlers:
        if not any(isinstance(f, PiiMaskingFilter) for f in handler.filters):
            handler.addFilter(PiiMaskingFilter())
