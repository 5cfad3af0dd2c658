import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from core.text import TRUNCATION_NOTE, clean_name, clean_user_text


def test_empty_and_whitespace_become_empty() -> None:
    assert clean_user_text("", 100).text == ""
    assert clean_user_text(" \n\t \r\n ", 100).text == ""


def test_control_characters_are_removed_but_lines_kept() -> None:
    cleaned = clean_user_text("he\x00llo\x1b[31m\r\nworld\x7f\tok", 100)
    assert cleaned.text == "hello[31m\nworld\tok"


def test_only_control_characters_become_empty() -> None:
    assert clean_user_text("\x00\x01\x02\x1b", 100).text == ""


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    cleaned = clean_user_text(b"caf\xc3\xa9 \xff\xfe ok", 100)
    assert cleaned.text == "café \ufffd\ufffd ok"


def test_lone_surrogates_are_replaced() -> None:
    cleaned = clean_user_text("a\ud800b", 100)
    assert cleaned.text == "a\ufffdb"
    cleaned.text.encode("utf-8")  # would raise if a surrogate survived


def test_100_kb_message_is_truncated_with_a_note() -> None:
    cleaned = clean_user_text("word " * 20_000, 4000)
    assert cleaned.truncated
    assert cleaned.original_chars == 100_000
    assert cleaned.text.endswith(TRUNCATION_NOTE)
    assert len(cleaned.text) <= 4000 + len(TRUNCATION_NOTE)


def test_runs_of_blank_lines_are_collapsed() -> None:
    assert clean_user_text("a\n\n\n\n\nb", 100).text == "a\n\nb"


def test_invisible_and_reordering_characters_are_removed() -> None:
    sneaky = "pay\u200b to\u202e evil\u2066 acc\U000e0041ount\ufeff"
    assert clean_user_text(sneaky, 100).text == "pay to evil account"
    assert clean_user_text("family 👨\u200d👩\u200d👧", 100).text == "family 👨\u200d👩\u200d👧"


def test_names_are_one_visible_bounded_line() -> None:
    assert clean_name("  Ann\u202e\n<@U1>\t ") == "Ann <@U1>"
    assert len(clean_name("x" * 500)) == 80
    assert clean_name("\u200b\u200b") == "someone"


@settings(max_examples=300, deadline=None)
@given(raw=st.text(max_size=300), limit=st.integers(min_value=1, max_value=200))
def test_cleaning_any_text_is_bounded_and_visible(raw: str, limit: int) -> None:
    clean = clean_user_text(raw, limit)
    assert len(clean.text) <= limit + len(TRUNCATION_NOTE)
    assert not any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t" for c in clean.text)
    assert "\u202e" not in clean.text and "\u200b" not in clean.text
    name = clean_name(raw)
    assert 0 < len(name) <= 80 and "\n" not in name
