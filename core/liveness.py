"""A worker's heartbeat: it keeps what the worker holds alive and says the worker is.

Every beat renews each conversation lock the worker holds (a lost one is logged), resets
the idle time of the jobs it still owns (so no other worker reclaims them), refreshes its
liveness record for `chatbot health`, and trims the job stream below what is done.
"""

from __future__ import annotations

import asyncio
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

    async def announce(self) -> None:
        """Tell `chatbot health` (and operators) that this worker is alive."""
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

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                for lock in list(self.store.held_locks):
                    await lock.renew()
                await self.queue.touch(self.owned_jobs())
                await self.announce()
                await trim_acknowledged(self.queue.redis, self.queue.keys.jobs)
            except TRANSIENT_ERRORS as exc:
                log.warning("heartbeat could not reach Redis: %s", exc)
