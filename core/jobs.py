"""The streams between the parts: jobs for the workers (a consumer group) with their
dead letters, and one outbox of replies per platform for its adapters."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import ResponseError

from core import metrics
from core.conversation import ConversationKey, Reply
from core.keys import DEAD_LETTER_MAXLEN, WORKER_GROUP, Keys
from core.redis_conn import Redis

log = logging.getLogger(__name__)

WAITING_CONSUMER = "waiting-their-turn"  # owns the jobs read ahead and parked (`park`)
PARKED_CLAIM_MIN_IDLE_MS = 50
REMEMBERED_ENTRIES = 8192  # parked jobs a worker keeps parsed (`peek_parked`)

Entry = tuple[str, dict[str, str]]


def consumer_name() -> str:
    """A consumer name unique to this process, for any consumer group."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Job:
    """One user message waiting for an answer."""

    entry_id: str
    conversation: ConversationKey
    seq: int
    message_id: str
    deliveries: int = 1
    author: str = ""  # who wrote it: batches are filled fairly, user by user
    # When the adapter received the message (epoch seconds; 0: not known), for the metrics.
    received_at: float = 0.0

    @property
    def entry_id_order(self) -> tuple[int, int]:
        """The stream entry id as a sortable pair: the order jobs arrived in."""
        return _parse_id(self.entry_id)

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str], deliveries: int = 1) -> Job:
        """Raises ValueError (or KeyError) for a malformed entry."""
        return cls(
            entry_id=entry_id,
            conversation=ConversationKey.from_id(fields["conversation"]),
            seq=int(fields["seq"]),
            message_id=fields["message_id"],
            deliveries=deliveries,
            author=fields.get("author", ""),
            received_at=float(fields.get("received_at") or fields.get("enqueued_at") or 0),
        )


class JobQueue:
    """The job stream, read by the worker consumer group, and its dead letters."""

    def __init__(self, redis: Redis, keys: Keys, consumer: str = "") -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._jobs: dict[str, Job] = {}  # parked jobs, by entry id (entries never change)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(
        self,
        conversation: ConversationKey,
        seq: int,
        message_id: str,
        author: str = "",
        received_at: float | None = None,
    ) -> str:
        now = time.time()
        fields = {
            "conversation": conversation.id,
            "seq": str(seq),
            "message_id": message_id,
            "author": author,
            "enqueued_at": f"{now:.3f}",
            "received_at": f"{received_at or now:.3f}",  # by the adapter
        }
        return await _xadd(self.redis, self.keys.jobs, fields, None)

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` new jobs, waiting up to `block_ms` (None: do not wait)."""
        response: Any = await self.redis.xreadgroup(
            WORKER_GROUP, self.consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        if not response:
            return []
        return [(entry_id, fields) for entry_id, fields in response[0][1]]

    async def read_jobs(self, count: int, block_ms: int | None) -> list[Job]:
        """Up to `count` new jobs (malformed entries go to the dead letters)."""
        entries = await self.read_new(count, block_ms)
        return [job for job in [await self._parse(e, f, 1) for e, f in entries] if job]

    async def claim_stale_jobs(self, min_idle_ms: int, count: int) -> list[Job]:
        """Jobs another worker left unfinished for `min_idle_ms`, now this consumer's."""
        jobs = []
        for entry_id, fields, deliveries in await self.claim_stale(min_idle_ms, count):
            job = await self._parse(entry_id, fields, deliveries)
            if job is not None:
                log.warning(
                    "claimed job %s of %s left unfinished (delivery %d)",
                    entry_id,
                    job.conversation.id,
                    deliveries,
                )
                jobs.append(job)
        return jobs

    async def _parse(self, entry_id: str, fields: dict[str, str], deliveries: int) -> Job | None:
        try:
            return Job.from_entry(entry_id, fields, deliveries)
        except (KeyError, ValueError) as exc:
            log.error("malformed job %s (%r): %s; moved to dead letters", entry_id, fields, exc)
            await self.dead_letter(entry_id, fields, f"malformed: {exc}")
            return None

    async def claim_stale(
        self, min_idle_ms: int, count: int
    ) -> list[tuple[str, dict[str, str], int]]:
        """Take over jobs another consumer left unacknowledged for `min_idle_ms`.

        Returns (entry id, fields, deliveries counting this one). Entries whose data was
        trimmed away come back with empty fields.
        """
        found: Any = await self.redis.xpending_range(
            self.keys.jobs, WORKER_GROUP, min="-", max="+", count=count, idle=min_idle_ms
        )
        # Jobs waiting their turn (`park`) were left by no one: `peek_parked` has them.
        pending = [p for p in found or [] if p["consumer"] != WAITING_CONSUMER]
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

    async def park(self, jobs: list[Job]) -> None:
        """Put jobs read but not taken into this batch where every worker can take them
        (`peek_parked`): owned by the pseudo-consumer `WAITING_CONSUMER`, with their
        delivery count unchanged."""
        if jobs:
            ids: list[Any] = [j.entry_id for j in jobs]
            await self.redis.xclaim(
                self.keys.jobs, WORKER_GROUP, WAITING_CONSUMER, 0, ids, justid=True
            )
            for job in jobs:  # `peek_parked` need not read them back
                self._remember(job)

    async def peek_parked(self, count: int) -> list[Job]:
        """Up to `count` parked jobs, oldest first, left parked: a batch takes the ones it
        chooses with `claim_parked`. (Taking them all and parking back what was not chosen
        moved the whole read-ahead to and fro at every step: most of a flood's cost.) A job
        is parsed once per worker (stream entries never change), and one this worker parked
        is not read back at all."""
        if count <= 0:
            return []
        pending: Any = await self.redis.xpending_range(
            self.keys.jobs,
            WORKER_GROUP,
            min="-",
            max="+",
            count=count,
            consumername=WAITING_CONSUMER,
        )
        if not pending:
            return []
        deliveries = {str(p["message_id"]): max(int(p["times_delivered"]), 1) for p in pending}
        known = {e: self._jobs[e] for e in deliveries if e in self._jobs}
        unknown = [entry_id for entry_id in deliveries if entry_id not in known]
        malformed: dict[str, dict[str, str]] = {}
        if unknown:  # parked by another worker: read once
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry_id in unknown:
                    pipe.xrange(self.keys.jobs, entry_id, entry_id)
                found: list[Any] = await pipe.execute()
            for entry_id, entries in zip(unknown, found, strict=True):
                fields = entries[0][1] if entries else {}
                try:
                    known[entry_id] = Job.from_entry(entry_id, fields, deliveries[entry_id])
                except (KeyError, ValueError):  # trimmed away (no fields), or malformed
                    malformed[entry_id] = fields
                else:
                    self._remember(known[entry_id])
        jobs: list[Job] = []
        for entry_id, delivered in deliveries.items():
            job = known.get(entry_id)
            if job is None:
                continue  # malformed: handled below
            if job.deliveries == delivered:
                jobs.append(job)
            else:
                jobs.append(replace(job, deliveries=delivered))
        if malformed:  # dead-lettered by the worker that takes them, once
            taken: Any = await self.redis.xclaim(
                self.keys.jobs,
                WORKER_GROUP,
                self.consumer,
                PARKED_CLAIM_MIN_IDLE_MS,
                list(malformed),
                justid=True,
            )
            for entry_id in map(str, taken):
                await self._parse(entry_id, malformed[entry_id], deliveries[entry_id])
        return jobs

    async def claim_parked(self, jobs: list[Job]) -> list[Job]:
        """The parked `jobs` this consumer could take: a claim needs a job idle for
        PARKED_CLAIM_MIN_IDLE_MS and resets that, so two workers never both get one."""
        if not jobs:
            return []
        ids: list[Any] = [j.entry_id for j in jobs]
        taken: Any = await self.redis.xclaim(
            self.keys.jobs,
            WORKER_GROUP,
            self.consumer,
            PARKED_CLAIM_MIN_IDLE_MS,
            ids,
            justid=True,
        )
        got = {str(entry_id) for entry_id in taken}
        return [j for j in jobs if j.entry_id in got]

    def _remember(self, job: Job) -> None:
        self._jobs[job.entry_id] = job
        while len(self._jobs) > REMEMBERED_ENTRIES:
            self._jobs.pop(next(iter(self._jobs)))

    async def touch(self, entry_ids: list[Any]) -> None:
        """Reset the idle time of jobs this consumer is still working on, and only of those
        it still owns: one another worker reclaimed meanwhile stays that worker's."""
        if not entry_ids:
            return
        owned: Any = await self.redis.xpending_range(
            self.keys.jobs,
            WORKER_GROUP,
            min="-",
            max="+",
            count=max(len(entry_ids), 100),
            consumername=self.consumer,
        )
        mine = {str(p["message_id"]) for p in owned}
        still_mine = [e for e in entry_ids if str(e) in mine]
        if still_mine:
            await self.redis.xclaim(
                self.keys.jobs, WORKER_GROUP, self.consumer, 0, still_mine, justid=True
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
        await _xadd(self.redis, self.keys.dead_letter, record, DEAD_LETTER_MAXLEN)
        await self.ack([entry_id])
        metrics.dead_lettered(fields.get("conversation", "").partition(":")[0], "job")

    async def waiting(self) -> int:
        """Entries in the job stream: with `trim_acknowledged`, about the work not done."""
        return int(await self.redis.xlen(self.keys.jobs))


class Outbox:
    """Where replies go: the outbox stream of the reply's platform."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def publish(self, reply: Reply) -> str:
        stream = self.keys.outbox(reply.conversation.platform)
        return await _xadd(self.redis, stream, reply.to_fields(), None)


async def _xadd(redis: Redis, stream: str, fields: dict[str, str], maxlen: int | None) -> str:
    values: dict[Any, Any] = dict(fields)
    entry_id = await redis.xadd(stream, values, maxlen=maxlen, approximate=True)
    return str(entry_id)


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = str(entry_id).partition("-")
    return int(ms), int(seq or 0)


async def trim_acknowledged(redis: Redis, stream: str) -> int:
    """Drop the entries every consumer group of `stream` has read and acknowledged; keep
    everything when no group reads it yet. Returns how many were dropped."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return 0
    needed: list[tuple[int, int]] = []
    for group in groups:
        summary: Any = await redis.xpending(stream, group["name"])
        if summary["pending"]:
            needed.append(_parse_id(summary["min"]))  # oldest still being worked on
        else:
            ms, seq = _parse_id(group["last-delivered-id"])
            needed.append((ms, seq + 1))  # all read so far is done
    if not needed:
        return 0
    ms, seq = min(needed)
    return int(await redis.xtrim(stream, minid=f"{ms}-{seq}", approximate=False))


def fair_share(jobs: list[Job], size: int) -> tuple[list[Job], list[Job]]:
    """At most `size` jobs taken user by user, in turn (oldest first for each), so that one
    user's many messages do not keep another's waiting; and the rest, for later. A
    conversation's jobs stay together (it is answered once, with all of them)."""
    by_conversation: dict[ConversationKey, list[Job]] = defaultdict(list)
    for job in sorted(jobs, key=lambda j: j.entry_id_order):
        by_conversation[job.conversation].append(job)
    by_author: dict[str, list[list[Job]]] = defaultdict(list)
    for conversation_jobs in by_conversation.values():
        by_author[conversation_jobs[0].author].append(conversation_jobs)
    taken: list[Job] = []
    # Each author's conversations, oldest first; a round takes one from each author.
    # (Rounds rebuild the list of authors left instead of removing from it: `list.remove`
    # compared whole queues of jobs, most of a flood's collecting time.)
    queues = [deque(q) for q in by_author.values()]
    while queues and len(taken) < size:
        for queue in queues:
            taken += queue.popleft()
            if len(taken) >= size:
                break
        queues = [q for q in queues if q]
    chosen = {j.entry_id for j in taken}
    return taken, [j for j in jobs if j.entry_id not in chosen]
