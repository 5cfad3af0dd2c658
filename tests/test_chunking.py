import pytest

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
