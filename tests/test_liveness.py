"""Loops that run beside a worker against a real redis-server, the heartbeat
(core/liveness.py) and a reply's watch for a handoff (core/answering.py): they end when
they are stopped, even when the cancellation meant to stop them is lost in a Redis call."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import answering
from core.conversation import ConversationKey
from core.jobs import JobQueue
from core.keys import Keys
from core.liveness import Liveness
from core.settings import Settings
from core.store import ConversationStore
from core.support.handoff import Handoffs


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


async def test_the_handoff_watch_of_a_reply_ends_though_a_redis_call_lost_its_cancellation(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reply being generated is watched for a person taking over; the watch is
    cancelled when the reply is done, and must end even if that cancellation is lost."""
    monkeypatch.setattr(answering, "HANDOFF_CHECK_S", 0.01)
    handoffs = Handoffs(redis, keys, 60)
    in_call = asyncio.Event()

    async def get(_conversation: ConversationKey) -> None:
        in_call.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # lost, as Python 3.11's wait_for can lose it
            return None

    handoffs.get = get  # type: ignore[assignment,method-assign]
    watch = asyncio.create_task(
        answering._wait_for_handoff(handoffs, ConversationKey("slack", "T1", "C1", "1.0"))
    )
    await asyncio.wait_for(in_call.wait(), 10)
    watch.cancel()
    done, _ = await asyncio.wait({watch}, timeout=10)
    assert watch in done and watch.cancelled()


async def test_replies_are_announced_once_a_second_at_most_and_never_after_quiet(
    redis: Any, settings: Settings, keys: Keys
) -> None:
    queue = JobQueue(redis, keys, consumer="w3")
    store = ConversationStore.from_settings(redis, settings)
    published = {"replies_published": 0}
    liveness = Liveness(queue, store, 60, owned_jobs=list, status=lambda: dict(published))
    writes = []
    announce = liveness.announce

    async def counted() -> None:
        writes.append(published["replies_published"])
        await announce()

    liveness.announce = counted  # type: ignore[method-assign]

    async def shown() -> int:
        raw = await redis.get(keys.worker("w3"))
        return int(json.loads(raw)["replies_published"]) if raw else -1

    # The first reply is announced at once.
    published["replies_published"] = 1
    liveness.announce_soon()
    for _ in range(200):
        if await shown() == 1:
            break
        await asyncio.sleep(0.01)
    assert await shown() == 1 and writes == [1]
    # Fifty more within the second: one announcement, when the second has passed, with
    # the latest count.
    for n in range(2, 52):
        published["replies_published"] = n
        liveness.announce_soon()
    for _ in range(400):
        if await shown() == 51:
            break
        await asyncio.sleep(0.01)
    assert await shown() == 51 and writes == [1, 51]
    # One more is due in a second; stopping drops it, and none is written afterwards.
    published["replies_published"] = 52
    liveness.announce_soon()
    await asyncio.wait_for(liveness.quiet(), 0.9)  # not after the second: at once
    assert liveness._due is None
    liveness.announce_soon()  # stopped: nothing more is scheduled
    assert liveness._due is None
    assert await shown() == 51 and writes == [1, 51]
