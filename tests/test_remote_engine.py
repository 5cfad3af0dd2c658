"""The worker generating with a remote OpenAI-compatible engine: a real `transformers serve`
process on the bundled model, streamed through the official `openai` client; the server
killed mid-stream ends in an apology, never silence."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.conversation import ConversationKey
from core.errors import POLITE_FAILURE
from core.generation.remote_engine import RemoteEngine
from core.keys import Keys
from core.redis_server import free_port
from core.settings import Settings
from core.worker import Worker
from tests.helpers import outbox, submit, wait_for

pytestmark = pytest.mark.slow

A = ConversationKey("test", "W", "C", "remote-a")
B = ConversationKey("test", "W", "C", "remote-b")


def serve(model_dir: Path, port: int) -> subprocess.Popen[bytes]:
    transformers_cli = Path(sys.executable).parent / "transformers"
    return subprocess.Popen(
        [
            str(transformers_cli),
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_a_remote_engine_streams_replies_and_its_failure_is_apologised_for(
    redis: Any, make_settings: Any, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    port = free_port()
    server = serve(model_dir, port)
    try:
        await wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 180, "transformers serve")
        settings: Settings = make_settings(
            CHATBOT_ENGINE_URL=f"http://127.0.0.1:{port}/v1",
            CHATBOT_ENGINE_MODEL=str(model_dir),
            CHATBOT_STREAMING="on",
            CHATBOT_MAX_NEW_TOKENS="200",
            CHATBOT_CONTEXT_TOKENS="2048",
            CHATBOT_RECLAIM_IDLE_S="1",
            CHATBOT_MAX_DELIVERIES="2",
        )
        engine = RemoteEngine(settings, AutoTokenizer.from_pretrained(model_dir))
        worker = Worker(redis, settings, engine)
        task = asyncio.create_task(worker.run())
        keys = Keys(settings.namespace)
        try:
            await submit(redis, settings, A, "How do I reset my password?", "a1")

            async def answered(count: int = 1) -> bool:
                return len(await outbox(redis, settings)) >= count

            await wait_for(answered, 120, "the remote engine's reply")
            [reply] = await outbox(redis, settings)
            assert reply.kind == "answer" and len(reply.text) > 20
            entries = await redis.xrange(keys.reply_stream(A, reply.reply_id))
            texts = [f["text"] for _, f in entries if "text" in f]
            assert texts and all(reply.text.startswith(t) for t in texts)  # it streamed

            await submit(redis, settings, B, "Tell me, at length, about your return policy.", "b1")

            async def streaming() -> bool:
                return bool(await redis.exists(keys.reply_stream(B, f"{B.id}:1")))

            await wait_for(streaming, 120, "the second reply to stream")
            server.send_signal(signal.SIGKILL)  # the engine dies mid-reply
            server.wait(timeout=30)
            await wait_for(lambda: answered(2), 60, "the apology")
            final = (await outbox(redis, settings))[-1]
            assert final.conversation == B and final.text == POLITE_FAILURE
            assert await redis.xlen(keys.dead_letter) == 1
        finally:
            worker.stop()
            await task
            await engine.aclose()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
