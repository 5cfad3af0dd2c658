"""A worker's heartbeat: it keeps what the worker holds alive and says the worker is.

Every beat renews each conversation lock the worker holds (a lost one is logged), resets
the idle time of the jobs it still owns (so no other worker reclaims them), refreshes its
liveness record for `chatbot health`, and trims the job stream below what is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from core.jobs import JobQueue, trim_acknowledged
from core.redis_conn import TRANSIENT_ERRORS
from core.store import ConversationStore

log = logging.getLogger(__name__)

ANNOUNCE_EVERY_S = 1.0  # the most often `announce_soon` writes the record


class Liveness:
    def __init__(
        self,
        queue: JobQueue,
        store: ConversationStore,
        interval_s: float,
        *,
        owned_jobs: Callable[[], list[str]],
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.queue = queue
        self.store = store
        self.interval_s = interval_s
        self.owned_jobs = owned_jobs
        self.status = status
        self.started_at = time.time()
        self._stopped = asyncio.Event()
        self._announced_at = -ANNOUNCE_EVERY_S  # monotonic
        self._due: asyncio.Task[None] | None = None

    def announce_soon(self) -> None:
        """Announce what changed (a reply was published): now when the last announcement
        is ANNOUNCE_EVERY_S old, else once it is. Under load that is one record written a
        second, not one per reply, and `chatbot health` is never more than that behind."""
        if self._due is not None or self._stopped.is_set():
            return  # one is due already
        wait_s = max(0.0, self._announced_at + ANNOUNCE_EVERY_S - time.monotonic())
        self._due = asyncio.get_running_loop().create_task(self._announce_after(wait_s))

    async def _announce_after(self, wait_s: float) -> None:
        try:
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), wait_s)
            if not self._stopped.is_set():
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self.announce()
        finally:
            self._due = None

    async def quiet(self) -> None:
        """Stop, and wait for an announcement under way (so that none is written after the
        caller removes the record)."""
        self.stop()
        due = self._due
        if due is not None:
            await asyncio.wait([due])

    async def announce(self) -> None:
        """Tell `chatbot health` (and operators) that this worker is alive."""
        self._announced_at = time.monotonic()
        record = {
            "consumer": self.queue.consumer,
            "pid": os.getpid(),
            "started_at": self.started_at,
            **self.status(),
        }
        await self.queue.redis.set(
            self.queue.keys.worker(self.queue.consumer),
            json.dumps(record),
            px=int(self.interval_s * 3000),
        )

    def stop(self) -> None:
        """End `run` at its next turn, whatever happens to a cancellation meanwhile."""
        self._stopped.set()

    async def run(self) -> None:
        """Beat every `interval_s` until `stop`. Stopping does not rely on cancellation
        alone: a cancellation that arrives inside a Redis call can come out of redis-py as a
        timeout error (a transient error here, logged and gone past), and the loop went on
        beating for ever after the worker had stopped (seen as a test's event loop that
        never closed)."""
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.interval_s)
            if self._stopped.is_set():
                return
            try:
                for lock in list(self.store.held_locks):
                    await lock.renew()
                await self.queue.touch(self.owned_jobs())
                await self.announce()
                await trim_acknowledged(self.queue.redis, self.queue.keys.jobs)
            except TRANSIENT_ERRORS as exc:
                log.warning("heartbeat could not reach Redis: %s", exc)
