"""Discord inbound that loses nothing: Discord never delivers a message twice, so one that
arrives while Redis is away waits in the adapter and is stored when Redis is back. Real
discord.py against the emulator, a real redis-server SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.redis_conn import connect
from core.redis_server import RedisServer
from tests import test_discord
from tests.helpers import ScriptedEngine, echo_answer
from tests.test_discord import BOT, CHANNEL, close, make_harness

restore_discord_globals = test_discord.restore_discord_globals  # autouse here too

pytestmark = pytest.mark.slow


async def harness_on(server: RedisServer, redis: Any, make_settings: Any, tiny_engine: Any) -> Any:
    return await make_harness(
        redis,
        lambda **o: make_settings(REDIS_URL=server.url, **o),
        ScriptedEngine(tiny_engine, echo_answer),
    )


async def test_messages_across_redis_restarts_are_answered_exactly_once(
    own_redis: RedisServer, make_settings: Any, tiny_engine: Any
) -> None:
    redis = connect(own_redis.url)
    harness = await harness_on(own_redis, redis, make_settings, tiny_engine)
    try:
        questions = []
        for i in range(10):
            questions.append(await harness.emulator.send_message(CHANNEL, f"{BOT} question {i}"))
            await asyncio.sleep(0.3)
            if i in (2, 6):
                own_redis.kill()
                await asyncio.sleep(1.0)
                own_redis.start()
        sentinel = await harness.emulator.send_message(CHANNEL, f"{BOT} sentinel")
        sent = await harness.wait_sent(CHANNEL, 11, timeout_s=60)
        assert any(s["content"] == "Answer to: sentinel" for s in sent)
        answers: dict[str, list[str]] = {}
        for s in sent:
            answers.setdefault(str(s["message_reference"]["message_id"]), []).append(s["content"])
        for i, question in enumerate(questions):
            assert answers[question["id"]] == [f"Answer to: question {i}"]
        assert answers[sentinel["id"]] == ["Answer to: sentinel"]
        assert len(sent) == 11
    finally:
        await close(harness)
        await redis.aclose()


async def test_thread_follow_ups_sent_while_redis_is_down_are_answered(
    own_redis: RedisServer, make_settings: Any, tiny_engine: Any
) -> None:
    """A follow-up in a thread the bot joined needs Redis even to be recognised as one."""
    redis = connect(own_redis.url)
    harness = await harness_on(own_redis, redis, make_settings, tiny_engine)
    emulator = harness.emulator
    try:
        threads = [(await emulator.create_thread(CHANNEL, f"topic {i}"))["id"] for i in range(4)]
        for tid in threads:
            await emulator.send_message(tid, f"{BOT} hello")
        for tid in threads:
            await harness.wait_sent(tid, 1)
        own_redis.kill()
        for i, tid in enumerate(threads):
            await emulator.send_message(tid, f"follow-up {i}")  # no mention needed in a thread
        await asyncio.sleep(1.5)
        own_redis.start()
        for i, tid in enumerate(threads):
            sent = await harness.wait_sent(tid, 2, timeout_s=60)
            assert [s["content"] for s in sent] == ["Answer to: hello", f"Answer to: follow-up {i}"]
        sentinel = await emulator.send_message(threads[0], "sentinel")
        await harness.wait_sent(threads[0], 3, timeout_s=60)
        assert harness.sent_in(threads[0])[-1]["content"] == "Answer to: sentinel"
        assert all(len(harness.sent_in(tid)) == 2 for tid in threads[1:])
        assert sentinel["id"]
    finally:
        await close(harness)
        await redis.aclose()
