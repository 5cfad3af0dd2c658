"""Posting replies from a platform's outbox stream: the part every adapter shares.

Adapter replicas read the outbox through one consumer group, so each reply is handled by
one replica; a replica that dies leaves its entries pending and another claims them. A
reply is posted in parts and each posted part is recorded (`Keys.posted`), so a retry or a
takeover resumes after the last part instead of posting the reply twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from bot.streaming import PostingLock, ShowPartial, StreamFollower
from core import metrics
from core.context import handling
from core.conversation import Reply
from core.jobs import consumer_name, trim_acknowledged
from core.keys import DEAD_LETTER_MAXLEN, POSTED_TTL_S, TRIM_EVERY_S, Keys, adapter_group
from core.redis_conn import TRANSIENT_ERRORS, Backoff, Redis, with_retry
from core.streaming import STREAM_KIND

log = logging.getLogger(__name__)

MAX_POST_ATTEMPTS = 5  # then the reply goes to the dead letters, for an operator to see


class PermanentPostError(Exception):
    """The platform refused the reply for good (no access to the channel, …): drop it."""


Poster = Callable[[Reply, "PostedParts"], Awaitable[None]]


class PostedParts:
    """Which parts of one reply are already on the platform, and their message ids."""

    def __init__(self, redis: Redis, key: str, done: dict[int, str]) -> None:
        self.redis = redis
        self.key = key
        self.done = done

    async def record(self, part: int, message_id: str) -> None:
        """Remember a part just posted. It is on the platform already, so this waits for
        Redis rather than fail: a reply whose post is not recorded would be posted again."""
        self.done[part] = message_id

        async def save() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key, str(part), message_id)
                pipe.expire(self.key, POSTED_TTL_S)
                await pipe.execute()

        await with_retry("recording a posted part", save)


class OutboxConsumer:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        platform: str,
        post: Poster,
        *,
        reclaim_idle_s: float = 30.0,
        retry_delay_s: float = 2.0,
        show_partial: ShowPartial | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.platform = platform
        self.post = post
        self.stream = keys.outbox(platform)
        self.group = adapter_group(platform)
        self.consumer = consumer_name()
        self.reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self.retry_delay_s = retry_delay_s
        self.stopping = asyncio.Event()
        # Without `show_partial` (a platform that cannot edit), streamed replies are
        # posted when complete.
        self.streams = (
            StreamFollower(redis, keys, show_partial, self.parts_for) if show_partial else None
        )

    def stop(self) -> None:
        self.stopping.set()

    async def parts_for(self, reply: Reply) -> PostedParts:
        """The parts of `reply` already on the platform (streamed ones included)."""
        key = self.keys.posted(reply.conversation, reply.reply_id)
        stored = await self.redis.hgetall(key)
        done = {int(part): str(message_id) for part, message_id in stored.items()}
        return PostedParts(self.redis, key, done)

    async def ensure_group(self) -> None:
        try:
            # "$": a new group starts with replies written from now on; older ones were for
            # adapters that are gone. An existing group keeps its place.
            await self.redis.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        backoff = Backoff(f"posting from the {self.platform} outbox")
        last_trim = 0.0
        while not self.stopping.is_set():
            try:
                await self.ensure_group()
                await self.step()
                backoff.succeeded()
                if time.monotonic() - last_trim >= TRIM_EVERY_S:
                    last_trim = time.monotonic()
                    await trim_acknowledged(self.redis, self.stream)
            except TRANSIENT_ERRORS as exc:
                await backoff.failed(exc)
        if self.streams is not None:
            await self.streams.stop()

    async def step(self, block_ms: int = 1000) -> int:
        """Post what is waiting; returns how many replies were handled."""
        claimed: Any = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.reclaim_idle_ms, count=10
        )
        entries = list(claimed[1]) if claimed else []
        if not entries:
            response: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=10, block=block_ms
            )
            entries = list(response[0][1]) if response else []
        for entry_id, fields in entries:
            if self.stopping.is_set():
                break
            await self._handle(entry_id, fields)
        return len(entries)

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        with handling(fields.get("conversation", ""), reply=fields.get("reply_id", "")):
            await self._handle_entry(entry_id, fields)

    async def _handle_entry(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            reply = Reply.from_fields(fields)
        except (KeyError, ValueError) as exc:
            log.error(
                "malformed %s outbox entry %s (fields %s): %s; dropped",
                self.platform,
                entry_id,
                sorted(fields),  # names only: a reply's text is customer data
                exc,
            )
            await self.redis.xack(self.stream, self.group, entry_id)
            return
        if reply.kind == STREAM_KIND:
            if self.streams is not None:
                self.streams.follow(reply)
            await self.redis.xack(self.stream, self.group, entry_id)
            return
        try:
            await self._post(reply)
        except PermanentPostError as exc:
            log.error("reply %s could not be posted and is dropped: %s", reply.reply_id, exc)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            attempts = await self._attempts(entry_id)
            if attempts < MAX_POST_ATTEMPTS:
                # Left pending: this or another replica claims it again after reclaim_idle_s.
                log.exception(
                    "posting reply %s failed (attempt %d of %d); it will be retried",
                    reply.reply_id,
                    attempts,
                    MAX_POST_ATTEMPTS,
                )
                await asyncio.sleep(self.retry_delay_s)
                return
            log.exception(
                "posting reply %s failed %d times; moved to dead letters", reply.reply_id, attempts
            )
            await self._dead_letter(entry_id, fields, f"posting failed: {exc!r}")
        await self.redis.xack(self.stream, self.group, entry_id)

    async def _post(self, reply: Reply) -> None:
        if self.streams is None:  # nothing here edits replies while they are generated
            await self.post(reply, await self.parts_for(reply))
            return
        # Under the lock a partial edit of a streamed reply cannot land after this.
        key = self.keys.posting_lock(reply.conversation, reply.reply_id)
        async with PostingLock(self.redis, key).held():
            await self.post(reply, await self.parts_for(reply))

    async def _attempts(self, entry_id: str) -> int:
        """How many times the group has handed this entry out (this time included)."""
        pending: Any = await self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 1

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], reason: str) -> None:
        record: dict[Any, Any] = {
            "entry_id": entry_id,
            "source": self.stream,
            "fields": json.dumps(fields, ensure_ascii=False),
            "reason": reason,
            "failed_at": f"{time.time():.3f}",
        }
        await self.redis.xadd(
            self.keys.dead_letter, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True
        )
        metrics.dead_lettered(self.platform, "post")
