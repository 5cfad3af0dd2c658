"""The worker's heartbeat (core/liveness.py) against a real redis-server: it stops when the
worker stops, even when the cancellation meant to stop it is lost inside a Redis call."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import TimeoutError as RedisTimeoutError

from core.jobs import JobQueue
from core.keys import Keys
from core.liveness import Liveness
from core.settings import Settings
from core.store import ConversationStore


async def test_a_stopped_heartbeat_ends_though_a_redis_call_swallowed_its_cancellation(
    redis: Any, settings: Settings, keys: Keys
) -> None:
    queue = JobQueue(redis, keys, consumer="w1")
    store = ConversationStore.from_settings(redis, settings)
    in_call = asyncio.Event()

    async def touch(_ids: list[str]) -> None:
        in_call.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # what a timeout inside redis-py can make of it
            raise RedisTimeoutError("Timeout reading from socket") from None

    queue.touch = touch  # type: ignore[method-assign]
    liveness = Liveness(queue, store, 0.01, owned_jobs=list, status=dict)
    heartbeat = asyncio.create_task(liveness.run())
    await asyncio.wait_for(in_call.wait(), 10)
    liveness.stop()
    heartbeat.cancel()  # as the worker does; this cancellation is lost in `touch`
    done, _ = await asyncio.wait({heartbeat}, timeout=10)
    assert heartbeat in done  # before: it went on beating, and the event loop never closed
    assert await redis.get(keys.worker("w1")) is None  # it never announced after the stop


async def test_the_heartbeat_announces_the_worker_until_stopped(
    redis: Any, settings: Settings, keys: Keys
) -> None:
    queue = JobQueue(redis, keys, consumer="w2")
    store = ConversationStore.from_settings(redis, settings)
    liveness = Liveness(queue, store, 0.05, owned_jobs=list, status=lambda: {"in_flight": 0})
    heartbeat = asyncio.create_task(liveness.run())
    for _ in range(200):
        if await redis.get(keys.worker("w2")):
            break
        await asyncio.sleep(0.05)
    assert await redis.get(keys.worker("w2"))
    liveness.stop()
    done, _ = await asyncio.wait({heartbeat}, timeout=10)
    assert heartbeat in done and heartbeat.exception() is None
