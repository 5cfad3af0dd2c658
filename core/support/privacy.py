"""User data controls: the index of a user's conversations, forgetting a user (done in
`core.support.forget`), exporting and importing a transcript.

Every conversation a user writes in is listed in `Keys.user_conversations` (expiring with the
conversations), so that forgetting them finds it quickly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from core.conversation import ConversationKey, Message
from core.keys import Keys
from core.redis_conn import Redis
from core.store import ConversationStore
from core.support.forget import ForgetReport, Forgetter

log = logging.getLogger(__name__)


class UserData:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def note_participation(self, platform: str, user_id: str, conversation_id: str) -> None:
        key = self.keys.user_conversations(platform, user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(key, conversation_id)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def forget(
        self,
        platform: str,
        user_id: str,
        *,
        holding: ConversationKey | None = None,
        lock_wait_s: float = 20.0,
    ) -> ForgetReport:
        """Delete everything stored about `user_id` on `platform` (`core.support.forget`).
        `holding`: a conversation whose lock the caller holds already."""
        # The store serves for the conversations' locks only.
        store = ConversationStore(self.redis, self.keys, max_messages=1, ttl_s=self.ttl_s)
        return await Forgetter(store, lock_wait_s).forget(platform, user_id, holding)


# -- transcripts -------------------------------------------------------------------------


def transcript_lines(conversation: ConversationKey, messages: Iterable[Message]) -> list[str]:
    """JSON Lines: one message per line, each naming its conversation."""
    lines = []
    for message in messages:
        data = json.loads(message.to_json())
        data["conversation"] = conversation.id
        lines.append(json.dumps(data, ensure_ascii=False))
    return lines


def parse_transcript(lines: Iterable[str]) -> tuple[ConversationKey | None, list[Message]]:
    """The conversation and messages of a JSON Lines transcript (blank lines ignored)."""
    conversation = None
    messages = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            conversation = ConversationKey.from_id(data.pop("conversation"))
            messages.append(Message.from_json(json.dumps(data)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not a transcript message ({exc})") from exc
    return conversation, messages


async def import_transcript(
    store: ConversationStore, conversation: ConversationKey, messages: Iterable[Message]
) -> int:
    """Append a transcript's messages to a conversation (new seqs; ids deduplicated)."""
    count = 0
    for message in messages:
        added = await store.add_message(conversation, message, f"import:{message.message_id}")
        count += added.is_new
    state = await store.state(conversation)
    # Imported messages are history, not questions waiting for an answer.
    await store.redis.hset(store.keys.state(conversation), "answered", state.seq)
    return count
