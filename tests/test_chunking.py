import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.chunking import split_message


def test_short_text_is_one_part() -> None:
    assert split_message("hello", 100) == ["hello"]


def test_parts_break_at_paragraphs_then_lines() -> None:
    paragraphs = [f"Paragraph {i}. " + "words " * 30 for i in range(10)]
    parts = split_message("\n\n".join(paragraphs), 500)
    assert all(len(p) <= 500 for p in parts)
    assert all(p.startswith("Paragraph") for p in parts)  # no part starts mid-paragraph
    assert " ".join(" ".join(parts).split()) == " ".join("\n\n".join(paragraphs).split())


@pytest.mark.parametrize("fence", ["```", "```python", "~~~"])
def test_a_long_code_block_is_closed_and_reopened(fence: str) -> None:
    marker = fence[:3]
    code = "\n".join(f"line_{i} = {i}" for i in range(300))
    text = f"Before.\n\n{fence}\n{code}\n{marker}\n\nAfter."
    parts = split_message(text, 400)
    assert all(len(p) <= 400 for p in parts)
    for part in parts:
        assert part.count(marker) % 2 == 0, part  # every part is valid on its own
    inner = next(p for p in parts if f"line_{150} =" in p)
    assert inner.startswith(fence + "\n")  # reopened with the same language
    joined = "\n".join(parts)
    assert all(f"line_{i} = {i}" in joined for i in range(300))
    assert parts[-1].endswith("After.")


def test_text_after_a_split_block_is_not_wrapped_in_code() -> None:
    code = "\n".join(f"x{i}" for i in range(200))
    parts = split_message(f"```\n{code}\n```\nThe end.", 300)
    last = parts[-1]
    assert last.endswith("The end.")
    assert last[: last.rindex("The end.")].count("```") % 2 == 0  # outside any code block


def test_a_single_huge_line_is_cut_at_spaces() -> None:
    text = "word " * 2000
    parts = split_message(text, 1000)
    assert all(len(p) <= 1000 for p in parts)
    assert sum(len(p.split()) for p in parts) == 2000


def test_a_fence_line_longer_than_a_part_terminates() -> None:
    """A model may write one: it used to loop forever, growing memory."""
    for text in ("```" + "x" * 5000, "```python " + "y " * 3000 + "\ncode\n```", "`" * 4000):
        parts = split_message(text, 2000)
        assert all(len(p) <= 2000 for p in parts)
        assert _is_subsequence("".join(text.split()), "".join("".join(parts).split()))


def _is_subsequence(needle: str, haystack: str) -> bool:
    it = iter(haystack)
    return all(ch in it for ch in needle)


_PIECES = st.sampled_from(
    ["```", "```python", "~~~", "`" * 12, " ", "\n", "\n\n", "word", "😀", "é", "x" * 50]
)
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=30)), max_size=60).map("".join)


@settings(max_examples=400, deadline=2000)
@given(text=_TEXT, limit=st.integers(min_value=20, max_value=300))
def test_split_message_always_terminates_within_the_limit(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(len(p) <= limit for p in parts)
    # Nothing is lost: every visible character comes out, in order (fences may be added).
    assert _is_subsequence("".join(text.split()), "".join("".join(parts).split()))
