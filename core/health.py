"""What `chatbot health` reports: Redis reachable, live workers, queue depth, dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from core.keys import WORKER_GROUP, Keys
from core.redis_conn import Redis


@dataclass
class Health:
    workers: list[dict[str, Any]] = field(default_factory=list)
    jobs_waiting: int = 0  # not yet read by any worker
    jobs_pending: int = 0  # read, not yet acknowledged
    dead_letters: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.workers)

    def to_json(self) -> str:
        data = {
            "ok": self.ok,
            "workers": self.workers,
            "jobs_waiting": self.jobs_waiting,
            "jobs_pending": self.jobs_pending,
            "dead_letters": self.dead_letters,
        }
        return json.dumps(data, indent=2)


async def check_health(redis: Redis, keys: Keys) -> Health:
    """Raises a redis ConnectionError if Redis cannot be reached."""
    health = Health()
    async for key in redis.scan_iter(match=keys.worker_pattern, count=100):
        raw = await redis.get(key)
        if raw:
            health.workers.append(json.loads(raw))
    try:
        groups: Any = await redis.xinfo_groups(keys.jobs)
    except ResponseError:  # no job stream yet
        groups = []
    for group in groups:
        if group["name"] == WORKER_GROUP:
            health.jobs_pending = int(group["pending"])
            health.jobs_waiting = int(group.get("lag") or 0)
    health.dead_letters = int(await redis.xlen(keys.dead_letter))
    return health
