"""Turning a conversation's history into the model's chat turns, within a token budget."""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.conversation import Message, Role
from core.generation.engine import ChatTurn, Engine, FinishReason

FALLBACK_REPLY = (
    "I'm sorry, I don't have a good answer to that. Could you rephrase your question, "
    "or would you like me to connect you with a human?"
)

_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)")


def history_turns(history: Sequence[Message]) -> list[ChatTurn]:
    """Chat turns for the history, oldest first, consecutive same-role messages merged.

    When several people speak, each user message names its author so the model can tell
    them apart; a human agent's words are quoted on the user side, marked as theirs.
    """
    speakers = {m.author_id for m in history if m.role is Role.USER}
    turns: list[ChatTurn] = []
    for message in history:
        if message.role is Role.USER:
            role = "user"
            content = (
                f"{message.author_name}: {message.text}" if len(speakers) > 1 else message.text
            )
        elif message.role is Role.HUMAN_AGENT:
            # Quoted as the agent's words on the customers' side, never as the bot's own
            # turn: what is said there cannot put words in the bot's mouth.
            role, content = "user", f"(Human agent {message.author_name}) {message.text}"
        elif message.role is Role.ASSISTANT:
            role, content = "assistant", message.text
        else:
            role, content = "system", message.text
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n" + content}
        else:
            turns.append({"role": role, "content": content})
    return turns


def build_prompt(
    persona: str, history: Sequence[Message], engine: Engine, max_new_tokens: int
) -> list[ChatTurn]:
    """System persona + the newest history that fits `context - max_new_tokens` tokens.

    The newest user turn is always kept; if it alone is too long it is cut to fit.
    """
    budget = engine.context_tokens - max_new_tokens
    system: ChatTurn = {"role": "system", "content": persona}
    turns = history_turns(history)
    while turns and turns[0]["role"] == "assistant" and len(turns) > 1:
        turns.pop(0)
    kept: list[ChatTurn] = []
    for turn in reversed(turns):
        candidate = [turn, *kept]
        if engine.count_tokens([system, *candidate]) <= budget:
            kept = candidate
            continue
        if not kept:  # the newest turn alone does not fit: shorten it
            overhead = engine.count_tokens([system, {"role": turn["role"], "content": ""}])
            room = max(budget - overhead - 8, 1)
            kept = [{"role": turn["role"], "content": engine.truncate(turn["content"], room)}]
        break
    while kept and kept[0]["role"] == "assistant":
        kept.pop(0)  # a prompt should open with the customer's words, not ours
    return [system, *kept]


def finalize_reply(text: str, finish_reason: FinishReason, shown: str = "") -> str:
    """The text to post: trimmed, cut back to a full sentence if generation hit its limit,
    but never shorter than what was already `shown` while it streamed (a cut there ends
    with "…" instead of taking words back)."""
    text = text.strip()
    if finish_reason == "length":
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        shown = shown.strip()
        if ends and ends[-1] > len(text) // 2 and ends[-1] >= len(shown):
            text = text[: ends[-1]]
        elif shown and text.startswith(shown) and len(shown) < len(text):
            text = shown + "…"
    return text or FALLBACK_REPLY
