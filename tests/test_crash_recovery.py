"""A worker killed with SIGKILL mid-generation: another takes the job over, one reply only."""

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey, Role
from core.keys import WORKER_GROUP, Keys
from core.redis_server import RedisServer
from core.settings import Settings
from tests.helpers import make_store, outbox, submit, wait_for
from tests.processes import CHAT_PERSONA, chatbot, chatbot_env

pytestmark = pytest.mark.slow

CONV = ConversationKey("test", "W", "C", "crash")


async def test_sigkilled_worker_is_replaced_and_exactly_one_reply_is_posted(
    tmp_path: Path, redis: Any, redis_server: RedisServer, namespace: str, model_dir: Path
) -> None:
    values = {
        "REDIS_URL": redis_server.url,
        "CHATBOT_NAMESPACE": namespace,
        "CHATBOT_MAX_NEW_TOKENS": "160",
        "CHATBOT_RECLAIM_IDLE_S": "2",
        "CHATBOT_LOCK_TTL_S": "3",
        **CHAT_PERSONA,
    }
    settings = Settings.from_mapping(values)
    keys = Keys(namespace)
    env = chatbot_env(**values)
    first = chatbot(["worker"], env, tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        await submit(
            redis,
            settings,
            CONV,
            "Please explain in detail, step by step, how to return a damaged product.",
            "m1",
        )

        async def generating() -> bool:
            return bool(await redis.exists(keys.lock(CONV)))

        await wait_for(generating, timeout_s=120, what="the first worker to start generating")
        await asyncio.sleep(1.0)
        assert await outbox(redis, settings) == [], "the reply came before the kill: test void"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        pending = await redis.xpending(keys.jobs, WORKER_GROUP)
        assert pending["pending"] == 1  # the dead worker's job is still pending

        second = chatbot(["worker"], env, tmp_path)

        async def answered() -> bool:
            return len(await outbox(redis, settings)) >= 1

        await wait_for(answered, timeout_s=180, what="the second worker's reply")
        time.sleep(3)  # room for a duplicate to appear, if there were one
        replies = await outbox(redis, settings)
        assert len(replies) == 1
        assert replies[0].reply_to == "m1" and replies[0].kind == "answer"
        assert (await redis.xpending(keys.jobs, WORKER_GROUP))["pending"] == 0
        history = await make_store(redis, settings).history(CONV)
        assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
    assert second is not None and second.returncode == 0
