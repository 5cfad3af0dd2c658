"""A worker SIGKILLed while its reply streams into Slack: the worker that takes the job over
finishes the same message, so the user sees exactly one reply (real processes, the bundled
model, the real slack-bolt adapter against the emulator)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bot.slack.format import markdown_to_mrkdwn
from core.redis_server import RedisServer
from core.settings import Settings
from tests.helpers import outbox, wait_for
from tests.processes import CHAT_PERSONA, chatbot, chatbot_env
from tests.slack_emulator import SlackEmulator, app_mention, event_callback, post_event
from tests.test_slack import SECRET, start_adapter

pytestmark = pytest.mark.slow


async def test_a_worker_killed_mid_stream_leaves_exactly_one_reply(
    tmp_path: Path, redis: Any, redis_server: RedisServer, namespace: str, model_dir: Path
) -> None:
    emulator = SlackEmulator()
    await emulator.start()
    emulator.add_user("U1", display_name="ann")
    values = {
        "REDIS_URL": redis_server.url,
        "CHATBOT_NAMESPACE": namespace,
        "CHATBOT_MAX_NEW_TOKENS": "160",
        "CHATBOT_RECLAIM_IDLE_S": "2",
        "CHATBOT_LOCK_TTL_S": "3",
        "CHATBOT_STREAMING": "on",
        **CHAT_PERSONA,
    }
    settings = Settings.from_mapping(
        {
            **values,
            "SLACK_BOT_TOKEN": "xoxb-test",
            "SLACK_SIGNING_SECRET": SECRET,
            "SLACK_API_URL": emulator.api_url,
        }
    )
    stop = asyncio.Event()
    adapter, url = await start_adapter(settings, redis, stop)
    env = chatbot_env(**values)
    first = chatbot(["worker"], env, tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        mention = app_mention(
            "<@UBOT> Please explain in detail, step by step, how to return a damaged product.",
            channel="C1",
        )
        await post_event(url, SECRET, event_callback(mention))
        # The first words are on screen: the stream is open and has grown.
        await emulator.wait_for(lambda: bool(emulator.calls_to("chat.appendStream")), 180)
        assert await outbox(redis, settings, "slack") == [], (
            "the reply came before the kill: test void"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        partial = emulator.messages_in("C1", mention["ts"])
        assert len(partial) == 1 and partial[0]

        second = chatbot(["worker"], env, tmp_path)

        async def answered() -> bool:
            return len(await outbox(redis, settings, "slack")) == 1

        await wait_for(answered, timeout_s=240, what="the second worker's reply")
        [final] = await outbox(redis, settings, "slack")
        wanted = {final.text, markdown_to_mrkdwn(final.text)}
        await emulator.wait_for(lambda: emulator.messages_in("C1", mention["ts"])[0] in wanted, 30)
        # One message in the thread: the one that streamed, finished by the second worker.
        assert len(emulator.messages_in("C1", mention["ts"])) == 1
        assert len(emulator.calls_to("chat.startStream")) == 1
        assert not [c for c in emulator.calls_to("chat.postMessage") if c.params.get("thread_ts")]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
        stop.set()
        await adapter
        await emulator.stop()
    assert second is not None and second.returncode == 0
