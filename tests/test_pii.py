import io
import logging
from collections.abc import Iterator

import pytest

from core.pii import PiiMaskingFilter, install_log_masking, mask_pii


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # e-mail addresses
        ("bob@example.com", "[email]"),
        ("mail Jane.Doe+tag@mail.example.co.uk.", "mail [email]."),
        ("from <alice_99@sub-domain.example.org>", "from <[email]>"),
        ("two: a@b.io, c.d@e.fr", "two: [email], [email]"),
        ("redis://user:secret@cache.example.com", "redis://user:[email]"),
        # phone numbers
        ("call +1 503-555-0142 now", "call [phone] now"),
        ("(503) 555-0142", "[phone]"),
        ("tel 503.555.0142.", "tel [phone]."),
        ("503-555-0142", "[phone]"),
        ("1-503-555-0142", "[phone]"),
        ("+1 (503) 555-0142", "[phone]"),
        ("+15035550142", "[phone]"),
        ("+44 20 7946 0958", "[phone]"),
        ("0044 20 7946 0958", "[phone]"),
        ("+44 (0) 20 7946 0958", "[phone]"),
        ("020 7946 0958", "[phone]"),
        ("01 23 45 67 89", "[phone]"),
        ("phone: +33 1 23 45 67 89, thanks", "phone: [phone], thanks"),
        ("call me at 555-0142", "call me at [phone]"),
        ("phone:+15035550142", "phone:[phone]"),
        # payment cards (Luhn-valid test numbers)
        ("4111 1111 1111 1111", "[card]"),
        ("4111-1111-1111-1111", "[card]"),
        ("card 4111111111111111 please", "card [card] please"),
        ("5500 0000 0000 0004", "[card]"),
        ("6011111111111117", "[card]"),
        ("3782 822463 10005", "[card]"),
        ("4222222222222", "[card]"),
        ("6304 0000 0000 0000 018", "[card]"),
        ("4111 1111 1111 1111 exp 12/27", "[card] exp 12/27"),
        ("4111 1111 1111 1111 123", "[card] 123"),
        ("cards 4111 1111 1111 1111 5500 0000 0000 0004", "cards [card] [card]"),
        ("card:4111111111111111.", "card:[card]."),
        ("x=4111-1111-1111-1111", "x=[card]"),
        # all three in one line
        (
            "user bob@example.com, +1 503-555-0142, 4111 1111 1111 1111",
            "user [email], [phone], [card]",
        ),
    ],
)
def test_personal_data_is_masked(text: str, expected: str) -> None:
    assert mask_pii(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        # Slack / Discord ids and mentions
        "U024BE7LH",
        "user U024BE7LH in C0123456789",
        "<@U024BE7LH> <#C0123456789|general>",
        "123456789012345678",
        "411111111111111118",  # a Luhn-valid 18-digit snowflake
        "<@123456789012345678>",
        "discord:123456789012345678:234567890123456789:345678901234567890",
        "slack:T024BE7LH:C0123456789:1700000000.000100",
        # timestamps, dates, times
        "1700000000.000100",
        "thread_ts=1700000000.000100",
        "1700000000",
        "1700000000129",  # Luhn-valid epoch milliseconds
        "1700000000129-0",  # a Redis stream id
        "2026-11-23",
        "2026-11-23 12:30:45",
        "2026-11-23T12:30:45Z",
        "2026-11-23 12:30:45,123 INFO chatbot started",
        "23.11.2026",
        "01-02-2026",
        "12:30:45",
        # versions, durations, network addresses
        "2.13.0",
        "transformers 4.56.1, torch 2.4.0",
        "0.08 s",
        "generated 128 tokens in 0.08 s",
        "redis://127.0.0.1:6379/0",
        "redis://192.168.100.200:6379/0",
        "192.168.100.200",
        "listening on :3000/slack/events",
        "port 6379",
        "localhost:6379",
        # UUIDs and other ids
        "123e4567-e89b-12d3-a456-426614174000",
        "550e8400-e29b-41d4-a716-446655440000",
        "550e8400e29b41d4a716446655440000",
        "41111111-1111-1111-abcd-ef0123456789",
        "HP-10482",
        "order HP-10482 shipped",
        # numbers that are not cards
        "4111111111111112",  # fails the Luhn check
        "took 1234.5678 ms",
        "lat 45.5231, -122.6765",
        "ping 8.8.8.8",
        "bob@localhost",
        "1234 5678 9012 3456",
        "",
        "no digits here at all",
    ],
)
def test_non_personal_data_is_left_alone(text: str) -> None:
    assert mask_pii(text) == text


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("test_pii_masking")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


def _stream_handler(logger: logging.Logger) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return stream


def test_child_logger_records_are_masked(logger: logging.Logger) -> None:
    stream = _stream_handler(logger)
    install_log_masking(logger)

    logger.getChild("worker").info("reply to %s at %s", "bob@example.com", "+1 503-555-0142")

    output = stream.getvalue()
    assert "bob@example.com" not in output
    assert "555-0142" not in output
    assert "test_pii_masking.worker INFO reply to [email] at [phone]" in output


def test_exception_messages_are_masked(logger: logging.Logger) -> None:
    stream = _stream_handler(logger)
    install_log_masking(logger)

    try:
        raise ValueError("no account for carol@example.com")
    except ValueError:
        logger.getChild("worker").exception("lookup failed for %s", "carol@example.com")

    output = stream.getvalue()
    assert "carol@example.com" not in output
    assert "lookup failed for [email]" in output
    assert "ValueError: no account for [email]" in output
    assert "Traceback (most recent call last)" in output


def test_install_is_idempotent(logger: logging.Logger) -> None:
    _stream_handler(logger)
    _stream_handler(logger)

    install_log_masking(logger)
    install_log_masking(logger)

    for handler in logger.handlers:
        assert sum(isinstance(f, PiiMaskingFilter) for f in handler.filters) == 1


def test_install_defaults_to_the_root_logger() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        install_log_masking()
        assert sum(isinstance(f, PiiMaskingFilter) for f in handler.filters) == 1
    finally:
        root.removeHandler(handler)


def test_bad_args_do_not_raise_from_the_filter(
    logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # no "--- Logging error ---" noise
    stream = _stream_handler(logger)
    install_log_masking(logger)

    logger.info("%d", "x")  # the handler reports the error itself; nothing propagates
    logger.info("still working for %s", "bob@example.com")

    assert "still working for [email]" in stream.getvalue()


def test_filter_leaves_unformattable_records_unchanged() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("x",), None)

    assert PiiMaskingFilter().filter(record) is True
    assert record.msg == "%d"
    assert record.args == ("x",)


def test_filter_renders_non_string_messages() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, {"to": "a@b.io"}, None, None)

    assert PiiMaskingFilter().filter(record) is True
    assert record.msg == "{'to': '[email]'}"
    assert record.args is None
    assert record.getMessage() == "{'to': '[email]'}"


def test_filter_masks_an_already_rendered_traceback() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    record.exc_text = "Traceback ...\nKeyError: 'dave@example.com'"

    assert PiiMaskingFilter().filter(record) is True
    assert record.exc_text == "Traceback ...\nKeyError: '[email]'"


def test_masked_message_with_percent_signs_survives_a_second_filter() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "100%% for %s", ("a@b.io",), None)

    PiiMaskingFilter().filter(record)
    PiiMaskingFilter().filter(record)

    assert record.getMessage() == "100% for [email]"


def test_long_inputs_are_handled_quickly() -> None:
    many_cards = "4111 1111 1111 1111 " * 5000
    assert mask_pii(many_cards) == "[card] " * 5000
    for text in ("1 " * 50000, "x" * 100_000, "a" * 50_000 + "@", "+1 " * 30000):
        assert len(mask_pii(text)) == len(text)
