"""Metrics, probes and JSON logs: `/metrics` scraped over HTTP after messages through the real
Slack adapter, Redis and worker; `/readyz` flipping when the model is loaded."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.slack.posting import web_client
from core.context import handling
from core.conversation import ConversationKey
from core.errors import POLITE_FAILURE, SettingsError
from core.generation.engine import Generation, GenerationRequest
from core.generation.transformers_engine import TransformersEngine
from core.logs import JsonFormatter
from core.pii import install_log_masking
from core.probes import outbox_group, reading_jobs, serve_probes
from core.redis_server import free_port
from core.settings import Settings
from core.worker import Worker
from tests.helpers import RecordingEngine, ScriptedEngine, echo_answer, submit, wait_for
from tests.slack_emulator import SlackEmulator, app_mention, event_callback, post_event
from tests.test_slack import SECRET, TEAM, Harness, close, make_harness

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """Every sample of `/metrics`, parsed by prometheus_client's own parser."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status, json.loads(await response.text())


def poisoned_or_echo(request: GenerationRequest) -> str:
    if "POISON" in request.turns[-1]["content"]:
        raise RuntimeError("a poisoned request")
    return echo_answer(request)


@asynccontextmanager
async def slack_with_probes(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> AsyncIterator[tuple[Harness, int]]:
    port = free_port()
    harness = await make_harness(
        redis,
        make_settings,
        ScriptedEngine(tiny_engine, poisoned_or_echo),
        CHATBOT_METRICS_PORT=str(port),
        CHATBOT_USER_RATE="4/h",
        CHATBOT_MAX_DELIVERIES="1",
    )
    assert harness.worker is not None
    try:
        async with serve_probes(harness.settings, harness.stop, ["worker", "slack"]) as probes:
            probes.connected(redis)
            probes.check("worker", reading_jobs(harness.worker.queue))
            probes.check("slack", outbox_group(redis, probes.keys, "slack"))
            yield harness, port
    finally:
        await close(harness)


async def test_counters_and_histograms_after_a_known_number_of_messages(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    async with slack_with_probes(redis, make_settings, tiny_engine) as (slack, port):

        async def ready() -> bool:
            return (await readyz(port))[0] == 200

        await wait_for(ready, 20, "/readyz to say ready")
        before = await scrape(port)
        # U1 (4 messages an hour): a question, Slack's retry of it (a duplicate, which does
        # not count against the rate), three more questions and a fifth one, refused. U2: a
        # question the engine fails on.
        mentions = [app_mention(f"<@UBOT> question {i}?", channel="C1") for i in range(5)]
        poison = app_mention("<@UBOT> POISON", user="U2", channel="C2")
        with json_log("core") as log_lines:
            assert (await slack.send(mentions[0]))[0] == 200
            retry = event_callback(mentions[0])
            assert (await post_event(slack.url, SECRET, retry, retry_num=1))[0] == 200
            for event in [*mentions[1:], poison]:
                assert (await slack.send(event))[0] == 200
            for i, mention in enumerate(mentions[:4]):
                await slack.wait_thread(
                    "C1", mention["ts"], lambda t, i=i: f"Answer to: question {i}?" in t
                )
            await slack.wait_thread("C2", poison["ts"], lambda t: POLITE_FAILURE in t)

        async def settled() -> bool:
            samples = await scrape(port)
            return value(samples, "chatbot_queue_depth") == 0 and (
                delta(before, samples, "chatbot_replies_total", platform="slack", kind="answer")
                == 4
            )

        await wait_for(settled, 20, "the jobs to be acknowledged")
        after = await scrape(port)

    def received(kind: str) -> float:
        return delta(before, after, "chatbot_messages_received_total", platform="slack", kind=kind)

    assert received("queued") == 5
    assert received("rate_limited") == 1
    assert received("duplicate") == 1
    assert delta(before, after, "chatbot_rate_limited_total", platform="slack") == 1
    assert delta(before, after, "chatbot_replies_total", platform="slack", kind="answer") == 4
    assert delta(before, after, "chatbot_replies_total", platform="slack", kind="apology") == 1
    assert delta(before, after, "chatbot_dead_letters_total", platform="slack", kind="job") == 1
    # ScriptedEngine counts one token per generated reply; the poisoned one made none.
    assert delta(before, after, "chatbot_generation_tokens_total", platform="slack") == 4
    # Every reply is timed from the adapter's receipt, the apology too.
    ttft = "chatbot_time_to_first_token_seconds"
    assert delta(before, after, f"{ttft}_count", platform="slack") == 5
    assert delta(before, after, "chatbot_e2e_reply_seconds_count", platform="slack") == 5
    assert delta(before, after, f"{ttft}_bucket", platform="slack", le="2560.0") == 5
    assert delta(before, after, f"{ttft}_sum", platform="slack") > 0
    assert value(after, "chatbot_queue_depth") == 0
    assert value(after, "chatbot_queue_oldest_pending_seconds") == 0
    assert value(after, "chatbot_batch_size") == 0
    # The log lines of the adapter's intake and of the worker name their conversation.
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    [refused] = [line for line in lines if "past CHATBOT_USER_RATE" in line["message"]]
    assert refused["conversation"] == ConversationKey("slack", TEAM, "C1", mentions[4]["ts"]).id
    generated = [line for line in lines if line["message"].startswith("generated ")]
    threads = [ConversationKey("slack", TEAM, "C1", m["ts"]).id for m in mentions[:4]]
    threads.append(ConversationKey("slack", TEAM, "C2", poison["ts"]).id)
    assert sorted(line["conversation"] for line in generated) == sorted(threads)
    assert all(len(line["jobs"]) == 1 for line in generated)


class GatedEngine(ScriptedEngine):
    """Streams a first word, then waits for `gate` before the rest."""

    def __init__(self, inner: TransformersEngine) -> None:
        super().__init__(inner, echo_answer)
        self.gate = asyncio.Event()

    async def stream(self, request: GenerationRequest, on_text: Any) -> Generation:
        on_text("Hello")
        await self.gate.wait()
        on_text("Hello there")
        return Generation(request.request_id, "Hello there", "stop", new_tokens=2)


async def test_a_streamed_reply_is_timed_from_its_first_text_and_counted_in_the_batch(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    port = free_port()
    settings = make_settings(CHATBOT_METRICS_PORT=str(port), CHATBOT_STREAMING="on")
    engine = GatedEngine(tiny_engine)
    worker = Worker(redis, settings, engine)
    async with serve_probes(settings) as probes:
        probes.connected(redis)
        before = await scrape(port)
        running = asyncio.create_task(worker.run())
        try:
            await submit(redis, settings, ConversationKey("test", "W1", "C1", "s"), "hi?", "m1")

            async def generating() -> bool:
                return value(await scrape(port), "chatbot_batch_size") == 1

            await wait_for(generating, 20, "the reply to be in the batch")
            engine.gate.set()

            async def answered() -> bool:
                samples = await scrape(port)
                replies = delta(
                    before, samples, "chatbot_replies_total", platform="test", kind="answer"
                )
                return replies == 1 and value(samples, "chatbot_queue_depth") == 0

            await wait_for(answered, 20, "the reply")
            after = await scrape(port)
        finally:
            worker.stop()
            await running
    ttft, e2e = "chatbot_time_to_first_token_seconds", "chatbot_e2e_reply_seconds"
    assert delta(before, after, f"{ttft}_count", platform="test") == 1
    assert delta(before, after, f"{e2e}_count", platform="test") == 1
    # The first text came while the gate held the rest back: before the reply was done.
    assert delta(before, after, f"{ttft}_sum", platform="test") < delta(
        before, after, f"{e2e}_sum", platform="test"
    )
    assert delta(before, after, "chatbot_generation_tokens_total", platform="test") == 2
    assert value(after, "chatbot_batch_size") == 0


async def test_queue_depth_counts_waiting_and_pending_jobs(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    port = free_port()
    settings = make_settings(CHATBOT_METRICS_PORT=str(port))
    conversation = ConversationKey("test", "W1", "C1", "t1")
    for i in range(3):
        await submit(redis, settings, conversation, f"question {i}", f"m{i}")
    async with serve_probes(settings) as probes:
        probes.connected(redis)
        waiting = await scrape(port)
        assert value(waiting, "chatbot_queue_depth") == 3
        assert value(waiting, "chatbot_queue_oldest_pending_seconds") >= 0
        # Read, not acknowledged: still in the queue.
        worker = Worker(redis, settings, tiny_engine)
        await worker.queue.ensure_group()
        assert len(await worker.queue.read_jobs(2, None)) == 2
        assert value(await scrape(port), "chatbot_queue_depth") == 3
        assert await worker.step() == 1  # the remaining one: one reply covering the three
        assert value(await scrape(port), "chatbot_queue_depth") == 2


async def test_readyz_says_not_ready_until_the_model_is_loaded(
    redis: Any,
    make_settings: Any,
    tiny_engine: TransformersEngine,
    embedder: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bot import serve

    loaded = asyncio.Event()
    engine = RecordingEngine(tiny_engine)  # its `close` leaves the shared engine open
    engine.executor = tiny_engine.executor  # type: ignore[attr-defined]

    async def open_engine(settings: Settings, progress: Any) -> Any:
        await loaded.wait()
        return engine

    monkeypatch.setattr("core.generation.transformers_engine.open_engine", open_engine)
    monkeypatch.setattr("core.knowledge.embeddings.load_embedder", lambda *_: embedder)
    port = free_port()
    settings = make_settings(CHATBOT_METRICS_PORT=str(port))
    stop = asyncio.Event()
    async with serve_probes(settings, stop, ["worker"]) as probes:
        probes.connected(redis)
        worker = asyncio.create_task(serve.serve_worker(settings, redis, stop, probes))

        async def loading() -> bool:
            status, body = await readyz(port)
            return status == 503 and body["checks"]["worker"] == "the model is not loaded yet"

        await wait_for(loading, 20, "/readyz to say the model is loading")
        assert (await readyz(port))[1]["checks"]["redis"] == "ok"
        loaded.set()

        async def ready() -> bool:
            return (await readyz(port))[0] == 200

        await wait_for(ready, 20, "/readyz to say ready")
        status, body = await readyz(port)
        assert body == {"ready": True, "checks": {"redis": "ok", "worker": "ok"}}
        stop.set()
        await worker
        status, body = await readyz(port)
        assert status == 503 and body["checks"]["process"] == "stopping"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            assert response.status == 200


async def test_readyz_is_503_while_redis_is_not_connected(make_settings: Any) -> None:
    port = free_port()
    async with serve_probes(make_settings(CHATBOT_METRICS_PORT=str(port)), parts=["slack"]):
        status, body = await readyz(port)
    assert status == 503
    assert body == {
        "ready": False,
        "checks": {"redis": "not connected yet", "slack": "not started yet"},
    }


async def test_a_metrics_port_in_use_is_a_clear_error(make_settings: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(CHATBOT_METRICS_PORT=str(port))
        with pytest.raises(SettingsError, match=f"CHATBOT_METRICS_PORT={port}: cannot listen"):
            async with serve_probes(settings):
                pass


async def test_slack_api_errors_and_retries_are_counted(make_settings: Any) -> None:
    emulator = SlackEmulator()
    await emulator.start()
    port = free_port()
    settings = make_settings(
        SLACK_BOT_TOKEN="xoxb-test", SLACK_API_URL=emulator.api_url, CHATBOT_METRICS_PORT=str(port)
    )
    client = web_client(settings)
    try:
        async with serve_probes(settings):
            before = await scrape(port)
            emulator.fail_next("chat.postMessage", status=429, retry_after_s=0)
            await client.chat_postMessage(channel="C1", text="hello")  # retried, then posted
            emulator.fail_next("chat.postMessage", status=200, error="channel_not_found")
            with pytest.raises(Exception, match="channel_not_found"):
                await client.chat_postMessage(channel="C1", text="hello")
            after = await scrape(port)
    finally:
        await emulator.stop()
    method = {"platform": "slack", "method": "chat.postMessage"}
    assert delta(before, after, "chatbot_platform_api_retries_total", **method) == 1
    assert delta(before, after, "chatbot_platform_api_errors_total", **method) == 1


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("CHATBOT_METRICS_PORT", "http", "must be a port number from 1 to 65535"),
        ("CHATBOT_METRICS_PORT", "0", "must be a port number from 1 to 65535"),
        ("CHATBOT_METRICS_PORT", "70000", "must be a port number from 1 to 65535"),
        ("CHATBOT_LOG_FORMAT", "xml", "is not one of: text, json"),
    ],
)
def test_bad_metrics_port_or_log_format_is_a_configuration_error(
    name: str, raw: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=f"{name}='{raw}' {message}"):
        Settings.from_mapping({name: raw})


def test_metrics_port_and_log_format_settings() -> None:
    assert Settings.from_mapping({}).metrics_port is None
    assert Settings.from_mapping({}).log_format == "text"
    assert Settings.from_mapping({"CHATBOT_METRICS_PORT": "9100"}).metrics_port == 9100
    assert Settings.from_mapping({"CHATBOT_METRICS_PORT": ""}).metrics_port is None
    assert Settings.from_mapping({"CHATBOT_LOG_FORMAT": "JSON"}).log_format == "json"


@contextmanager
def json_log(logger_name: str) -> Iterator[io.StringIO]:
    """JSON lines of `logger_name` at INFO, through the personal-data filter, as the
    `chatbot` command sets them up."""
    logger = logging.getLogger(logger_name)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    install_log_masking(logger)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_json_log_lines_carry_the_context_and_are_masked() -> None:
    log = logging.getLogger("chatbot.test_json")
    with json_log("chatbot.test_json") as out:
        with handling("slack:T1:C1:1.5", ["1-0", "2-0"]):
            log.info("customer wrote from %s", "ann@example.com")
            try:
                raise ValueError("call me on +44 20 7946 0958")
            except ValueError:
                log.exception("failed for card 4111 1111 1111 1111")
        log.warning("outside")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "customer wrote from [email]"
    assert first["level"] == "INFO" and first["logger"] == "chatbot.test_json"
    assert first["conversation"] == "slack:T1:C1:1.5" and first["jobs"] == ["1-0", "2-0"]
    assert first["time"].endswith("+00:00")
    assert second["message"] == "failed for card [card]"
    assert "ValueError: call me on [phone]" in second["exception"]
    assert "7946" not in out.getvalue() and "ann@example.com" not in out.getvalue()
    assert "conversation" not in third and third["message"] == "outside"


async def test_the_workers_json_log_lines_name_the_conversation_and_jobs(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    conversation = ConversationKey("test", "W1", "C1", "json-logs")
    await submit(redis, settings, conversation, "my mail is bob@example.com", "m1")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    with json_log("core") as out:
        assert await worker.step() == 1
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    [generated] = [line for line in lines if line["message"].startswith("generated ")]
    assert generated["conversation"] == conversation.id
    assert len(generated["jobs"]) == 1 and generated["logger"] == "core.worker"


async def test_discord_api_errors_and_retries_are_counted(redis: Any, make_settings: Any) -> None:
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    from bot.discord import DiscordAdapter
    from tests.discord_emulator import DEFAULT_CHANNEL_ID, DiscordEmulator

    old = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY  # DiscordAdapter sets both
    emulator = DiscordEmulator()
    await emulator.start()
    port = free_port()
    settings = make_settings(
        DISCORD_TOKEN="test-token",
        DISCORD_API_URL=emulator.api_url,
        DISCORD_GATEWAY_URL=emulator.gateway_url,
        CHATBOT_METRICS_PORT=str(port),
    )
    http = DiscordAdapter(redis, settings).client.http
    typing = Route("POST", "/channels/{channel_id}/typing", channel_id=DEFAULT_CHANNEL_ID)
    try:
        async with serve_probes(settings):
            await http.static_login("test-token")
            before = await scrape(port)
            emulator.rate_limit_next(f"POST /channels/{DEFAULT_CHANNEL_ID}/typing", 0.05)
            await http.request(typing)  # retried once, then done
            emulator.fail_next(f"POST /channels/{DEFAULT_CHANNEL_ID}/typing", status=403)
            with pytest.raises(Exception, match="403"):
                await http.request(typing)
            after = await scrape(port)
    finally:
        await http.close()
        await emulator.stop()
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old
    method = {"platform": "discord", "method": "POST /channels/{channel_id}/typing"}
    assert delta(before, after, "chatbot_platform_api_retries_total", **method) == 1
    assert delta(before, after, "chatbot_platform_api_errors_total", **method) == 1
    assert emulator.typing == [DEFAULT_CHANNEL_ID]


@pytest.mark.slow
def test_chatbot_run_serves_one_port_for_its_parts_with_json_logs(
    tmp_path: Any, model_dir: Any
) -> None:
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tests.processes import CHAT_PERSONA, chatbot, chatbot_env

    port = free_port()
    env = chatbot_env(
        CHATBOT_DATA_DIR=str(tmp_path / "data"),
        CHATBOT_MAX_NEW_TOKENS="16",
        CHATBOT_METRICS_PORT=str(port),
        CHATBOT_LOG_FORMAT="json",
        **CHAT_PERSONA,
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def poll(condition: Any, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if condition():
                    return
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def samples() -> Samples:
        found: Samples = {}
        for family in text_string_to_metric_families(get("/metrics")[1]):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    proc = chatbot(["run"], env, tmp_path, stdin=subprocess.PIPE)
    try:
        poll(lambda: get("/readyz")[0] == 200, "/readyz to say ready")
        assert json.loads(get("/readyz")[1]) == {
            "ready": True,
            "checks": {"redis": "ok", "worker": "ok"},
        }
        assert proc.stdin is not None
        proc.stdin.write("Hello, I am ann@example.com\nHow do I reset my password?\n")
        proc.stdin.flush()
        replies = ("chatbot_replies_total", (("kind", "answer"), ("platform", "console")))
        poll(lambda: samples().get(replies) == 2, "two replies")
        found = samples()
        _out, err = proc.communicate("", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    console = {"platform": "console"}
    assert value(found, "chatbot_messages_received_total", kind="queued", **console) == 2
    assert value(found, "chatbot_time_to_first_token_seconds_count", **console) == 2
    assert value(found, "chatbot_e2e_reply_seconds_count", **console) == 2
    assert value(found, "chatbot_generation_tokens_total", **console) > 0
    lines = [
        json.loads(line) for line in (tmp_path / "data" / "chatbot.log").read_text().splitlines()
    ]
    generated = [line for line in lines if line["message"].startswith("generated ")]
    assert len(generated) == 2
    assert all(line["conversation"].startswith("console:") and line["jobs"] for line in generated)
    assert "ann@example.com" not in (tmp_path / "data" / "chatbot.log").read_text()


async def test_a_discord_adapter_is_ready_once_connected_to_the_gateway(
    redis: Any, make_settings: Any
) -> None:
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    from bot import serve
    from tests.discord_emulator import DiscordEmulator

    old = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY  # DiscordAdapter sets both
    emulator = DiscordEmulator(heartbeat_interval_ms=1000)
    await emulator.start()
    port = free_port()
    settings = make_settings(
        DISCORD_TOKEN="test-token",
        DISCORD_API_URL=emulator.api_url,
        DISCORD_GATEWAY_URL=emulator.gateway_url,
        CHATBOT_METRICS_PORT=str(port),
    )
    stop = asyncio.Event()
    emulator.pause_gateway()  # the adapter's connection waits before HELLO
    try:
        async with serve_probes(settings, stop, ["discord"]) as probes:
            probes.connected(redis)
            adapter = asyncio.create_task(serve.serve_discord(settings, redis, stop, probes))

            async def connecting() -> bool:
                status, body = await readyz(port)
                why = body["checks"]["discord"]
                return status == 503 and why == "not connected to the Discord gateway yet"

            await wait_for(connecting, 20, "/readyz to wait for the gateway")
            emulator.resume_gateway()

            async def ready() -> bool:
                return (await readyz(port))[0] == 200

            await wait_for(ready, 30, "/readyz to say ready")
            assert (await readyz(port))[1]["checks"] == {"redis": "ok", "discord": "ok"}
            stop.set()
            await adapter
    finally:
        await emulator.stop()
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old
