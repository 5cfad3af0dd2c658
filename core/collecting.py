"""Which jobs a worker prepares next.

Those whose conversation was locked by another worker last time come back (they take no
room in the batch, so the read always waits for new work instead of spinning on them);
then a fair share (`fair_share`: user by user) of the waiting ones: parked, reclaimed from
dead workers, and new. The rest are parked again, where any worker takes them next. A job
delivered more than `max_deliveries` times is given up (dead letter and apology).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from core.jobs import PARKED_CLAIM_MIN_IDLE_MS, Job, JobQueue, fair_share
from core.settings import Settings

# Jobs read ahead of the batch, in batches, to fill it fairly in a flood; those not taken
# are parked where every worker can take them (`JobQueue.park`).
READ_AHEAD_BATCHES = 8


class Collector:
    def __init__(
        self,
        queue: JobQueue,
        settings: Settings,
        give_up: Callable[[Job, str], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.give_up = give_up
        self.deferred: dict[str, Job] = {}  # their conversation was locked by another
        self._last_reclaim = 0.0

    def defer(self, job: Job) -> None:
        """Try `job` again next time (its conversation is busy)."""
        self.deferred[job.entry_id] = job

    async def collect(self, room: int | None = None) -> list[Job]:
        """The jobs to prepare now, at most `room` new ones (see the module's docstring)."""
        s = self.settings
        room_in_batch = s.max_batch_size if room is None else room
        locked = list(self.deferred.values())
        self.deferred.clear()
        ahead = READ_AHEAD_BATCHES * s.max_batch_size
        parked = {job.entry_id: job for job in await self.queue.peek_parked(ahead)}
        waiting = {job.entry_id: job for job in await self._reclaim()}
        room = ahead - len(parked) - len(waiting)
        if room > 0:
            # Wait for new jobs only when none is waiting already.
            block_ms = None if parked or waiting else (200 if locked else 1000)
            new = await self.queue.read_jobs(room, block_ms)
            if new and len(new) < room and s.batch_wait_ms > 0:
                # A short pause lets the rest of a burst arrive and join this batch.
                await asyncio.sleep(s.batch_wait_ms / 1000)
                new += await self.queue.read_jobs(room - len(new), block_ms=None)
            waiting.update((job.entry_id, job) for job in new)
        runnable = []
        for job in [*locked, *parked.values(), *waiting.values()]:
            if job.deliveries > s.max_deliveries:
                if job.entry_id in parked and not await self.queue.claim_parked([job]):
                    continue  # another worker took it
                await self.give_up(job, f"delivered {job.deliveries - 1} times without success")
            elif job.entry_id not in self.deferred:
                runnable.append(job)
        locked_ids = {job.entry_id for job in locked}
        fresh = [job for job in runnable if job.entry_id not in locked_ids]
        batch, later = fair_share(fresh, room_in_batch)
        chosen = await self.queue.claim_parked([j for j in batch if j.entry_id in parked])
        taken = {j.entry_id for j in chosen}
        batch = [j for j in batch if j.entry_id not in parked or j.entry_id in taken]
        await self.queue.park([j for j in later if j.entry_id not in parked])
        if parked and not batch and not locked:
            # Only parked jobs another worker claimed a moment ago: not a spin.
            await asyncio.sleep(PARKED_CLAIM_MIN_IDLE_MS / 1000)
        return [*(job for job in runnable if job.entry_id in locked_ids), *batch]

    async def _reclaim(self) -> list[Job]:
        """Jobs other workers left unfinished, looked for every `reclaim_idle_s / 2`."""
        s = self.settings
        now = time.monotonic()
        if now - self._last_reclaim < s.reclaim_idle_s / 2:
            return []
        self._last_reclaim = now
        return await self.queue.claim_stale_jobs(int(s.reclaim_idle_s * 1000), s.max_batch_size)
