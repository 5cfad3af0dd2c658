"""The job stream (consumer group), the dead-letter stream and the per-platform outboxes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from core.conversation import ConversationKey, Reply
from core.keys import DEAD_LETTER_MAXLEN, JOBS_MAXLEN, OUTBOX_MAXLEN, WORKER_GROUP, Keys
from core.redis_conn import Redis

Entry = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class Job:
    """One user message waiting for an answer."""

    entry_id: str
    conversation: ConversationKey
    seq: int
    message_id: str
    deliveries: int = 1

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str], deliveries: int = 1) -> Job:
        """Raises ValueError (or KeyError) for a malformed entry."""
        return cls(
            entry_id=entry_id,
            conversation=ConversationKey.from_id(fields["conversation"]),
            seq=int(fields["seq"]),
            message_id=fields["message_id"],
            deliveries=deliveries,
        )


class JobQueue:
    def __init__(self, redis: Redis, keys: Keys, consumer: str = "") -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, conversation: ConversationKey, seq: int, message_id: str) -> str:
        fields = {
            "conversation": conversation.id,
            "seq": str(seq),
            "message_id": message_id,
            "enqueued_at": f"{time.time():.3f}",
        }
        return await self._xadd(self.keys.jobs, fields, JOBS_MAXLEN)

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` new jobs, waiting up to `block_ms` (None: do not wait)."""
        response: Any = await self.redis.xreadgroup(
            WORKER_GROUP, self.consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        if not response:
            return []
        return [(entry_id, fields) for entry_id, fields in response[0][1]]

    async def claim_stale(
        self, min_idle_ms: int, count: int
    ) -> list[tuple[str, dict[str, str], int]]:
        """Take over jobs another consumer left unacknowledged for `min_idle_ms`.

        Returns (entry id, fields, deliveries counting this one). Entries whose data was
        trimmed away come back with empty fields.
        """
        pending: Any = await self.redis.xpending_range(
            self.keys.jobs, WORKER_GROUP, min="-", max="+", count=count, idle=min_idle_ms
        )
        if not pending:
            return []
        deliveries = {p["message_id"]: int(p["times_delivered"]) + 1 for p in pending}
        ids: list[Any] = list(deliveries)
        claimed: Any = await self.redis.xclaim(
            self.keys.jobs, WORKER_GROUP, self.consumer, min_idle_ms, ids
        )
        out = []
        for entry_id, fields in claimed:
            out.append((entry_id, fields or {}, deliveries.get(entry_id, 1)))
        return out

    async def touch(self, entry_ids: list[Any]) -> None:
        """Reset the idle time of jobs this consumer is still working on."""
        if entry_ids:
            await self.redis.xclaim(
                self.keys.jobs, WORKER_GROUP, self.consumer, 0, entry_ids, justid=True
            )

    async def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            await self.redis.xack(self.keys.jobs, WORKER_GROUP, *entry_ids)

    async def dead_letter(self, entry_id: str, fields: dict[str, str], reason: str) -> None:
        record = {
            "entry_id": entry_id,
            "fields": json.dumps(fields, ensure_ascii=False),
            "reason": reason,
            "failed_at": f"{time.time():.3f}",
        }
        await self._xadd(self.keys.dead_letter, record, DEAD_LETTER_MAXLEN)
        await self.ack([entry_id])

    async def publish(self, reply: Reply) -> str:
        return await self._xadd(
            self.keys.outbox(reply.conversation.platform), reply.to_fields(), OUTBOX_MAXLEN
        )

    async def _xadd(self, stream: str, fields: dict[str, str], maxlen: int) -> str:
        values: dict[Any, Any] = dict(fields)
        entry_id = await self.redis.xadd(stream, values, maxlen=maxlen, approximate=True)
        return str(entry_id)
