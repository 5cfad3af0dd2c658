"""`chatbot data export`: training sets from what the service collected in Redis.

- `sft`: each conversation as `{"messages": [...]}`: customers' turns as the user's, the
  bot's replies and the human agents' words as the assistant's (the targets);
- `kto`: each rated bot answer as `{"prompt", "completion", "label"}`: 👍 desirable, 👎
  undesirable (several ratings of one answer: their sum decides; a tie is left out);
- `dpo`: each bot answer a human agent corrected (rated 👎, or followed by a handoff and a
  person answering) as `{"prompt", "chosen", "rejected"}`: the agent's words chosen.

What goes in is what a team may train on: e-mail addresses, phone and card numbers are
masked as in the logs (`core.pii`), and a user who asked to be forgotten is gone from Redis
already, so from every export. Only the support team's words are recorded as a human
agent's (the adapters check who may act as one), so only they become targets. Notices,
apologies and support alerts are the service talking, not answers: left out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.conversation import ConversationKey, Message, Role
from core.generation.engine import ChatTurn
from core.keys import Keys
from core.pii import mask_pii
from core.redis_conn import Redis
from core.store import ConversationStore

Kind = Literal["sft", "kto", "dpo"]
KINDS: tuple[Kind, ...] = ("sft", "kto", "dpo")
ANSWER_KINDS = ("answer", "decline", "small_talk", "no_documents")


@dataclass
class Collected:
    conversation: ConversationKey
    history: list[Message]
    kinds: dict[str, str]  # reply id -> kind, from the answers record
    ratings: dict[str, int]  # reply id -> sum of ratings


async def collected(redis: Redis, keys: Keys, store: ConversationStore) -> AsyncIterator[Collected]:
    async for key in redis.scan_iter(match=keys.history_pattern, count=500):
        conversation_id = keys.conversation_of_history(str(key))
        if conversation_id is None:
            continue
        try:
            conversation = ConversationKey.from_id(conversation_id)
        except ValueError:
            continue
        history = await store.history(conversation)
        if not history:
            continue
        answers = await redis.hgetall(keys.answers(conversation))
        kinds = {str(k): str(json.loads(v).get("kind", "")) for k, v in answers.items()}
        ratings: dict[str, int] = {}
        for field, value in (await redis.hgetall(keys.feedback(conversation))).items():
            reply_id = str(field).rsplit("|", 1)[0]
            ratings[reply_id] = ratings.get(reply_id, 0) + int(value)
        yield Collected(conversation, history, kinds, ratings)


def _is_answer(message: Message, found: Collected) -> bool:
    """A bot reply that answered the customer (not a notice, apology or alert)."""
    if message.role is not Role.ASSISTANT:
        return False
    kind = found.kinds.get(message.message_id)
    return kind in ANSWER_KINDS if kind is not None else True


def turns_before(history: Sequence[Message], index: int, found: Collected) -> list[ChatTurn]:
    """The chat turns before `history[index]` (masked, same roles merged)."""
    turns: list[ChatTurn] = []
    for message in history[:index]:
        if message.role is Role.USER:
            role = "user"
        elif message.role is Role.HUMAN_AGENT or _is_answer(message, found):
            role = "assistant"
        else:
            continue
        text = mask_pii(message.text)
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n" + text}
        else:
            turns.append({"role": role, "content": text})
    while turns and turns[0]["role"] == "assistant":
        turns.pop(0)
    return turns


def sft_rows(found: Collected) -> list[dict[str, Any]]:
    turns = turns_before(found.history, len(found.history), found)
    if not any(t["role"] == "assistant" for t in turns):
        return []
    while turns and turns[-1]["role"] == "user":  # nothing answered it (yet)
        turns.pop()
    return [{"messages": turns}]


def kto_rows(found: Collected) -> list[dict[str, Any]]:
    rows = []
    for index, message in enumerate(found.history):
        rating = found.ratings.get(message.message_id, 0)
        if rating == 0 or not _is_answer(message, found):
            continue
        prompt = turns_before(found.history, index, found)
        if not prompt:
            continue
        rows.append(
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": mask_pii(message.text)}],
                "label": rating > 0,
            }
        )
    return rows


def dpo_rows(found: Collected) -> list[dict[str, Any]]:
    rows = []
    history = found.history
    for index, message in enumerate(history):
        if not _is_answer(message, found) or found.kinds.get(message.message_id) != "answer":
            continue
        later = history[index + 1 :]
        agent = next((m for m in later if m.role is Role.HUMAN_AGENT), None)
        if agent is None:
            continue
        # The agent must be correcting this answer: no other bot answer in between.
        between = later[: later.index(agent)]
        if any(_is_answer(m, found) and found.kinds.get(m.message_id) == "answer" for m in between):
            continue
        handed_off = any(found.kinds.get(m.message_id) == "handoff" for m in between)
        if not (handed_off or found.ratings.get(message.message_id, 0) < 0):
            continue
        prompt = turns_before(history, index, found)
        if not prompt:
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": mask_pii(agent.text)}],
                "rejected": [{"role": "assistant", "content": mask_pii(message.text)}],
            }
        )
    return rows


ROW_MAKERS = {"sft": sft_rows, "kto": kto_rows, "dpo": dpo_rows}


async def export(
    redis: Redis, keys: Keys, store: ConversationStore, kind: Kind
) -> list[dict[str, Any]]:
    make = ROW_MAKERS[kind]
    rows: list[dict[str, Any]] = []
    async for found in collected(redis, keys, store):
        rows += make(found)
    return rows
