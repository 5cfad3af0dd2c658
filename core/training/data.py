"""Dialogue files, read strictly, and the training rows made from them.

A file is a JSON array, or JSON Lines, of objects of either form (DESIGN.md):

- `{"dialogue": ["…", "…", …]}` (the seed documents' format, optionally with a "system"
  text): turns alternate between the customer and the assistant and the last one is the
  assistant's, so an odd number of turns starts with the assistant (a greeting);
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}`.

Every problem is a `DataError` naming the file, the entry (array index or line number,
from 1) and what is wrong, so that a team can fix its data instead of guessing.

Each assistant turn becomes one prompt/completion row: the system prompt and the turns
before it as the prompt, the turn as the completion. Loss is then on assistant tokens only
whatever the chat template (SmolLM2's has no generation markers), and the same rows serve
training (`core.training.sft`) and evaluation (`core.training.evaluate`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.generation.engine import ChatTurn

ROLES = ("system", "user", "assistant")
MAX_FILE_BYTES = 200_000_000


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[ChatTurn, ...]
    where: str  # "file: entry N", for messages about it


@dataclass(frozen=True)
class Row:
    """One assistant turn to learn or to score, with everything said before it."""

    prompt: tuple[ChatTurn, ...]  # starts with the system turn
    completion: str
    where: str


def load_dialogues(paths: Iterable[Path]) -> list[Dialogue]:
    dialogues: list[Dialogue] = []
    for path in paths:
        dialogues += read_file(Path(path))
    return dialogues


def read_file(path: Path) -> list[Dialogue]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{path}: {size:,} bytes is more than {MAX_FILE_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at {exc.start})") from None
    entries = _entries(path, text)
    if not entries:
        raise DataError(f"{path}: holds no dialogues")
    return [parse_dialogue(entry, f"{path}: entry {number}") for number, entry in entries]


def _entries(path: Path, text: str) -> list[tuple[int, Any]]:
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return list(enumerate(data, start=1))
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: entry {number}: not valid JSON ({exc.msg})") from None
    return entries


def parse_dialogue(entry: Any, where: str) -> Dialogue:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if "dialogue" in entry and "messages" in entry:
        raise DataError(f"{where}: has both 'dialogue' and 'messages'; use one")
    if "dialogue" in entry:
        return Dialogue(tuple(_from_dialogue(entry, where)), where)
    if "messages" in entry:
        return Dialogue(tuple(_from_messages(entry["messages"], where)), where)
    raise DataError(f"{where}: needs a 'dialogue' list or a 'messages' list")


def _from_dialogue(entry: dict[str, Any], where: str) -> list[ChatTurn]:
    turns = entry["dialogue"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'dialogue' must be a non-empty list of texts")
    result: list[ChatTurn] = []
    system = entry.get("system")
    if system is not None:
        result.append({"role": "system", "content": _text(system, f"{where}: 'system'")})
    for index, turn in enumerate(turns):
        # Counted from the end: the last turn is the assistant's.
        role = "assistant" if (len(turns) - 1 - index) % 2 == 0 else "user"
        result.append({"role": role, "content": _text(turn, f"{where}: turn {index + 1}")})
    return result


def _from_messages(messages: Any, where: str) -> list[ChatTurn]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    result: list[ChatTurn] = []
    for index, message in enumerate(messages):
        at = f"{where}: message {index + 1}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise DataError(f"{at}: a system turn may only come first")
        if result and result[-1]["role"] == role:
            raise DataError(f"{at}: two {role} turns in a row; merge them")
        result.append({"role": role, "content": _text(message.get("content"), at)})
    if not any(turn["role"] == "assistant" for turn in result):
        raise DataError(f"{where}: has no assistant turn to learn from")
    return result


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: is empty")
    return value.strip()


def rows(dialogues: Sequence[Dialogue], persona: str) -> list[Row]:
    """One row per assistant turn; dialogues without a system turn get `persona`, the
    serving system prompt, so the model learns in the setting it will answer in."""
    found: list[Row] = []
    for dialogue in dialogues:
        turns = list(dialogue.turns)
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": persona})
        for index, turn in enumerate(turns):
            if turn["role"] == "assistant":
                found.append(
                    Row(tuple(turns[:index]), turn["content"], f"{dialogue.where}: turn {index}")
                )
    return found


def tokenize_row(tokenizer: Any, row: Row, max_tokens: int) -> dict[str, list[int]]:
    """`input_ids` of prompt + completion through the chat template, and `completion_mask`
    (1 on the completion's tokens, its end-of-turn marker included: the model must learn
    when to stop). Long prompts lose their oldest tokens, never the completion's."""
    prompt_ids = _template(tokenizer, list(row.prompt), generation_prompt=True)
    full = _template(
        tokenizer,
        [*row.prompt, {"role": "assistant", "content": row.completion}],
        generation_prompt=False,
    )
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{row.where}: the chat template does not extend the prompt")
    completion_ids = full[len(prompt_ids) :]
    if len(completion_ids) >= max_tokens:
        completion_ids = completion_ids[: max_tokens - 1]
    keep = max_tokens - len(completion_ids)
    prompt_ids = prompt_ids[-keep:]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def _template(tokenizer: Any, turns: list[ChatTurn], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        turns, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]
