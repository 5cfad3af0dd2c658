"""The Slack adapter on the real slack-bolt AsyncApp, against the local Slack emulator, with a
real Redis and a real worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from bot.slack import MESSAGE_LIMIT, RESET_DONE, WORKING_TEXT, SlackAdapter
from core.conversation import ConversationKey, Role
from core.errors import POLITE_FAILURE
from core.generation.engine import Engine
from core.generation.transformers_engine import TransformersEngine
from core.keys import Keys
from core.knowledge.retrieval import Retriever
from core.redis_server import free_port
from core.settings import Settings
from core.worker import Worker
from tests.helpers import RecordingEngine, ScriptedEngine, echo_answer, make_store, wait_for
from tests.slack_emulator import (
    SlackEmulator,
    app_mention,
    event_callback,
    message,
    post_event,
    post_slash_command,
    slash_command,
)

SECRET = "test-signing-secret"
TEAM = "T0001"


@dataclass
class Harness:
    emulator: SlackEmulator
    settings: Settings
    redis: Any
    url: str
    engine: Any
    worker: Worker | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, event: dict[str, Any], **kwargs: Any) -> tuple[int, str]:
        return await post_event(self.url, SECRET, event_callback(event), **kwargs)

    def thread(self, channel: str, thread_ts: str | None) -> list[str]:
        return self.emulator.messages_in(channel, thread_ts)

    async def sentinel(self, channel: str = "D1", thread_ts: str | None = None) -> list[str]:
        """Send a message that must be answered (a DM by default, or in the thread
        `thread_ts` the bot is in) and wait for its answer, instead of waiting a fixed time
        to see that something did not happen: the conversation's earlier work is done by
        then. Returns the conversation's messages."""
        if thread_ts is None:
            event = message("sentinel", channel=channel, channel_type="im")
        else:
            event = message("sentinel", channel=channel, thread_ts=thread_ts)
        status, _ = await self.send(event)
        assert status == 200
        return await self.wait_thread(
            channel, thread_ts, lambda t: any(x.endswith("sentinel") for x in t)
        )

    async def wait_thread(
        self, channel: str, thread_ts: str | None, predicate: Callable[[list[str]], bool]
    ) -> list[str]:
        await self.emulator.wait_for(lambda: predicate(self.thread(channel, thread_ts)), 30)
        return self.thread(channel, thread_ts)


async def start_adapter(
    settings: Settings, redis: Any, stop: asyncio.Event
) -> tuple[asyncio.Task[None], str]:
    port = free_port()
    task = asyncio.create_task(SlackAdapter(redis, settings).serve(stop, port=port))
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        if task.done():
            task.result()  # raise what stopped it
        try:
            async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, 20, "the Slack adapter to listen")
    return task, url + "/slack/events"


async def make_harness(
    redis: Any,
    make_settings: Any,
    engine: Engine,
    retriever: Retriever | None = None,
    **overrides: str,
) -> Harness:
    emulator = SlackEmulator()
    await emulator.start()
    emulator.add_user("U1", display_name="ann")
    emulator.add_user("U2", display_name="bob")
    settings = make_settings(
        SLACK_BOT_TOKEN="xoxb-test",
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=emulator.api_url,
        CHATBOT_RECLAIM_IDLE_S="1",
        **overrides,
    )
    harness = Harness(emulator, settings, redis, "", engine)
    task, harness.url = await start_adapter(settings, redis, harness.stop)
    worker = Worker(redis, settings, engine, retriever=retriever)
    harness.worker = worker
    harness.tasks += [task, asyncio.create_task(worker.run())]
    return harness


async def close(harness: Harness) -> None:
    harness.stop.set()
    if harness.worker is not None:
        harness.worker.stop()
    await asyncio.gather(*harness.tasks)
    await harness.emulator.stop()


@pytest.fixture
async def slack(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> AsyncIterator[Harness]:
    harness = await make_harness(redis, make_settings, ScriptedEngine(tiny_engine, echo_answer))
    yield harness
    await close(harness)


def conversation(channel: str, thread: str) -> ConversationKey:
    return ConversationKey("slack", TEAM, channel, thread)


async def test_a_mention_is_answered_in_a_thread_under_it(slack: Harness) -> None:
    mention = app_mention("<@UBOT> how do I reset my password?", channel="C1")
    status, _ = await slack.send(mention)
    assert status == 200
    texts = await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer to" in x for x in t))
    # The "working on it" message was replaced by the answer, not left behind.
    assert texts == ["Answer to: how do I reset my password?"]
    assert any(
        c.params.get("text") == WORKING_TEXT for c in slack.emulator.calls_to("chat.postMessage")
    )
    assert slack.emulator.calls_to("chat.update")
    history = await make_store(slack.redis, slack.settings).history(
        conversation("C1", mention["ts"])
    )
    assert next((m.role, m.author_name, m.message_id) for m in history) == (
        Role.USER,
        "ann",
        mention["ts"],
    )


async def test_follow_ups_in_a_joined_thread_need_no_mention(slack: Harness) -> None:
    mention = app_mention("<@UBOT> my order is late", channel="C1")
    await slack.send(mention)
    await slack.wait_thread("C1", mention["ts"], lambda t: len(t) == 1 and "Answer" in t[0])
    await slack.send(message("it was due monday", user="U2", channel="C1", thread_ts=mention["ts"]))
    texts = await slack.wait_thread("C1", mention["ts"], lambda t: len(t) == 2 and "Answer" in t[1])
    assert texts[1] == "Answer to: bob: it was due monday"  # two speakers: each one named
    # A thread the bot never joined stays quiet, as does a top-level channel message.
    await slack.send(message("unrelated chatter", channel="C1", thread_ts="1600000000.000001"))
    await slack.send(message("top-level chatter", channel="C1"))
    await slack.sentinel("C1", mention["ts"])
    assert slack.thread("C1", "1600000000.000001") == []
    assert len(slack.emulator.posted) == 3  # working messages, each replaced by an answer


async def test_two_threads_never_share_history(slack: Harness) -> None:
    first = app_mention("<@UBOT> question alpha", channel="C1")
    second = app_mention("<@UBOT> question beta", channel="C1")
    await slack.send(first)
    await slack.send(second)
    await slack.wait_thread("C1", first["ts"], lambda t: len(t) == 1 and "Answer" in t[0])
    await slack.wait_thread("C1", second["ts"], lambda t: len(t) == 1 and "Answer" in t[0])
    requests = slack.engine.requests
    alpha = [r for r in requests if "alpha" in str(r.turns)]
    assert alpha and all("beta" not in str(r.turns) for r in alpha)


async def test_direct_messages_are_answered_top_level_or_in_their_thread(slack: Harness) -> None:
    dm = message("hello there", channel="D1", channel_type="im")
    await slack.send(dm)
    top = await slack.wait_thread("D1", None, lambda t: any("Answer" in x for x in t))
    assert top == ["Answer to: hello there"]
    threaded = message("a threaded question", channel="D1", channel_type="im", thread_ts=dm["ts"])
    await slack.send(threaded)
    in_thread = await slack.wait_thread("D1", dm["ts"], lambda t: any("threaded" in x for x in t))
    assert in_thread == ["Answer to: a threaded question"]


async def test_forged_and_stale_requests_are_refused(slack: Harness) -> None:
    keys = Keys(slack.settings.namespace)
    forged, _ = await slack.send(app_mention("<@UBOT> hi"), signature="v0=" + "0" * 64)
    stale, _ = await slack.send(app_mention("<@UBOT> hi"), timestamp=1_600_000_000)
    assert (forged, stale) == (401, 401)
    # Refused before anything is stored: no job; and no reply before the sentinel's.
    assert not await slack.redis.exists(keys.jobs) or await slack.redis.xlen(keys.jobs) == 0
    assert await slack.sentinel() == ["Answer to: sentinel"]
    assert len(slack.emulator.posted) == 1


async def test_retries_and_double_delivery_post_one_reply(slack: Harness) -> None:
    mention = app_mention("<@UBOT> is anyone there?", channel="C1")
    payload = event_callback(mention)
    assert (await post_event(slack.url, SECRET, payload))[0] == 200
    assert (await post_event(slack.url, SECRET, payload, retry_num=1))[0] == 200
    assert (await post_event(slack.url, SECRET, payload, retry_num=2))[0] == 200
    # Slack also delivers a mention as a plain `message` event.
    same = message(mention["text"], channel="C1", ts=mention["ts"])
    await slack.send(same)
    await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer" in x for x in t))
    texts = await slack.sentinel("C1", mention["ts"])
    assert texts[0] == "Answer to: is anyone there?" and len(texts) == 2
    assert len(slack.engine.requests) == 2  # the question once, then the sentinel


@pytest.mark.parametrize(
    "event",
    [
        message("beep", bot_id="B999", user="U999", channel="D1", channel_type="im"),
        message("my own words", user="UBOT", channel="D1", channel_type="im"),
        message("edited", subtype="message_changed", channel="D1", channel_type="im"),
        message("", subtype="message_deleted", channel="D1", channel_type="im"),
        message("joined", subtype="channel_join", channel="C1"),
        {"type": "message", "subtype": "message_changed", "channel": "D1", "hidden": True},
        {"type": "reaction_added", "user": "U1", "reaction": "thumbsup"},
    ],
)
async def test_bots_edits_and_other_events_never_trigger_a_reply(
    slack: Harness, event: dict[str, Any]
) -> None:
    status, _ = await slack.send(event)
    assert status == 200
    assert await slack.sentinel() == ["Answer to: sentinel"]
    assert len(slack.emulator.posted) == 1  # the sentinel's answer only
    assert slack.tasks[0].done() is False  # the adapter is still serving


async def test_markdown_becomes_mrkdwn_and_long_replies_are_split(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    code = "\n".join(f"step_{i} = run({i})  # a line of the script" for i in range(120))
    long_text = (
        "**Here is the fix.**\n\n"
        + "Some explanation. " * 150
        + f"\n\n```python\n{code}\n```\n\n"
        + "Done, see [the docs](https://example.com/docs)."
    )
    harness = await make_harness(
        redis, make_settings, ScriptedEngine(tiny_engine, lambda r: long_text)
    )
    try:
        mention = app_mention("<@UBOT> give me the script", channel="C1")
        await harness.send(mention)
        texts = await harness.wait_thread(
            "C1", mention["ts"], lambda t: any("docs" in x for x in t)
        )
    finally:
        await close(harness)
    assert len(texts) >= 3
    assert all(len(t) <= MESSAGE_LIMIT for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)  # no part ends inside a code block
    assert texts[0].startswith("*Here is the fix.*")
    assert texts[-1].endswith("Done, see <https://example.com/docs|the docs>.")
    joined = "\n".join(texts)
    assert all(f"step_{i} = run({i})" in joined for i in range(120))
    assert "```python" not in joined  # Slack would show the language name as code


async def test_a_rate_limited_post_is_retried_and_posted_once(slack: Harness) -> None:
    slack.emulator.fail_next("chat.update", status=429, retry_after_s=1)
    mention = app_mention("<@UBOT> are you rate limited?", channel="C1")
    await slack.send(mention)
    await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer" in x for x in t))
    texts = await slack.sentinel("C1", mention["ts"])
    assert texts[0] == "Answer to: are you rate limited?" and len(texts) == 2
    # The 429 and the success for the answer, then the sentinel's answer.
    assert len(slack.emulator.calls_to("chat.update")) == 3


async def test_a_failed_generation_gets_an_apology_in_the_thread(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    engine = RecordingEngine(tiny_engine, fail_marker="explode")
    harness = await make_harness(redis, make_settings, engine, CHATBOT_MAX_DELIVERIES="1")
    try:
        mention = app_mention("<@UBOT> please explode", channel="C1")
        await harness.send(mention)
        texts = await harness.wait_thread("C1", mention["ts"], lambda t: POLITE_FAILURE in t)
    finally:
        await close(harness)
    assert texts == [POLITE_FAILURE]
    assert "Error" not in texts[0] and "Traceback" not in texts[0]


async def test_ask_and_reset_commands(slack: Harness) -> None:
    form = slash_command("/ask", "what are your opening hours?", channel="C1")
    form["response_url"] = slack.emulator.new_response_url()
    status, body = await post_slash_command(slack.url, SECRET, form)
    assert status == 200

    def asked() -> list[dict[str, Any]]:
        return [p for p in slack.emulator.posted if "asked: what are your opening" in p["text"]]

    await slack.emulator.wait_for(lambda: bool(asked()), 10)
    root = asked()[0]
    texts = await slack.wait_thread("C1", root["ts"], lambda t: any("Answer" in x for x in t))
    assert texts == ["Answer to: what are your opening hours?"]

    dm = message("remember me", channel="D1", channel_type="im")
    await slack.send(dm)
    await slack.wait_thread("D1", None, lambda t: any("Answer to: remember me" in x for x in t))
    store = make_store(slack.redis, slack.settings)
    assert await store.history(conversation("D1", ""))
    status, body = await post_slash_command(
        slack.url, SECRET, slash_command("/reset", channel="D1")
    )
    assert status == 200 and RESET_DONE in body
    assert await store.history(conversation("D1", "")) == []
    # After a reset the conversation goes on: a new question gets its own answer (its
    # reply must not be taken for the one posted before the reset).
    await slack.send(message("remember me", channel="D1", channel_type="im"))
    texts = await slack.wait_thread(
        "D1", None, lambda t: sum("Answer to: remember me" in x for x in t) == 2
    )
    assert texts.count("Answer to: remember me") == 2


async def test_two_adapter_replicas_post_one_reply(
    slack: Harness,
) -> None:
    other_task, other_url = await start_adapter(slack.settings, slack.redis, slack.stop)
    slack.tasks.append(other_task)
    mention = app_mention("<@UBOT> one answer please", channel="C1")
    payload = event_callback(mention)
    results = await asyncio.gather(
        post_event(slack.url, SECRET, payload), post_event(other_url, SECRET, payload)
    )
    assert [status for status, _ in results] == [200, 200]
    await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer" in x for x in t))
    texts = await slack.sentinel("C1", mention["ts"])
    assert texts[0] == "Answer to: one answer please" and len(texts) == 2


async def test_socket_mode_receives_acks_and_answers(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    emulator = SlackEmulator()
    await emulator.start()
    settings = make_settings(
        SLACK_BOT_TOKEN="xoxb-test", SLACK_APP_TOKEN="xapp-test", SLACK_API_URL=emulator.api_url
    )
    stop = asyncio.Event()
    worker = Worker(redis, settings, ScriptedEngine(tiny_engine, echo_answer))
    tasks = [
        asyncio.create_task(SlackAdapter(redis, settings).serve(stop)),
        asyncio.create_task(worker.run()),
    ]
    try:
        await emulator.wait_socket_connected(20)
        mention = app_mention("<@UBOT> over the socket", channel="C9")
        envelope = await emulator.socket_send_event(event_callback(mention))
        await emulator.wait_socket_ack(envelope)
        again = await emulator.socket_send_event(
            event_callback(mention), retry_attempt=1, retry_reason="timeout"
        )
        await emulator.wait_socket_ack(again)
        await emulator.wait_for(
            lambda: "Answer to: over the socket" in emulator.messages_in("C9", mention["ts"]), 30
        )
        # A sentinel in the same thread, over the socket too: once it is answered, the
        # retried event before it was handled.
        sentinel = message("sentinel", channel="C9", thread_ts=mention["ts"])
        await emulator.wait_socket_ack(await emulator.socket_send_event(event_callback(sentinel)))
        await emulator.wait_for(
            lambda: "Answer to: sentinel" in emulator.messages_in("C9", mention["ts"]), 30
        )
        assert emulator.messages_in("C9", mention["ts"]) == [
            "Answer to: over the socket",
            "Answer to: sentinel",
        ]
    finally:
        stop.set()
        worker.stop()
        await asyncio.gather(*tasks)
        await emulator.stop()


@pytest.mark.slow
async def test_round_trip_with_the_bundled_model(
    redis: Any, make_settings: Any, bundled_engine: TransformersEngine
) -> None:
    harness = await make_harness(redis, make_settings, bundled_engine, CHATBOT_MAX_NEW_TOKENS="48")
    try:
        mention = app_mention("<@UBOT> Hello! How can I change my e-mail address?", channel="C1")
        await harness.send(mention)
        texts = await harness.wait_thread(
            "C1", mention["ts"], lambda t: bool(t) and t[0] != WORKING_TEXT
        )
    finally:
        await close(harness)
    assert len(texts) == 1 and len(texts[0]) > 10
    history = await make_store(redis, harness.settings).history(conversation("C1", mention["ts"]))
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT]
    assert json.dumps(texts)  # plain text, postable


@pytest.mark.slow
async def test_chatbot_run_serves_slack_end_to_end(tmp_path: Any, model_dir: Any) -> None:
    """The real command, as an operator starts it: embedded Redis, worker and Slack adapter."""
    import signal

    from tests.processes import chatbot, chatbot_env

    emulator = SlackEmulator()
    await emulator.start()
    port = free_port()
    env = chatbot_env(
        CHATBOT_DATA_DIR=str(tmp_path / "data"),
        CHATBOT_MAX_NEW_TOKENS="32",
        SLACK_BOT_TOKEN="xoxb-test",
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=emulator.api_url,
    )
    proc = chatbot(["run", "--slack-port", str(port)], env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        async def listening() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(listening, 120, "chatbot run to serve Slack")
        mention = app_mention("<@UBOT> Hi, where can I see my invoices?", channel="C7")
        status, _ = await post_event(url + "/slack/events", SECRET, event_callback(mention))
        assert status == 200
        await emulator.wait_for(
            lambda: any(t != WORKING_TEXT for t in emulator.messages_in("C7", mention["ts"])), 120
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        await emulator.stop()
    assert proc.returncode == 0, err
    [answer] = emulator.messages_in("C7", mention["ts"])
    assert len(answer) > 5 and "Traceback" not in err
