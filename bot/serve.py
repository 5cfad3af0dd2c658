"""The long-running commands: run, worker, chat, slack, discord.

Each imports what it runs when it starts, so that an adapter never loads torch, and the
Slack adapter never loads discord.py (nor the Discord one slack-bolt).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bot.admin import ingest
from bot.redis_session import Embedded, redis_session
from core.errors import SettingsError
from core.keys import Keys
from core.probes import Probes, outbox_group, reading_jobs, serve_probes, waiting
from core.redis_conn import Redis, with_retry
from core.settings import Settings
from core.start_up_memory import frozen_start_up

log = logging.getLogger("chatbot")

EXIT_FAILURE = 1


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set `stop` (in-flight work drains); a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("second %s: exiting without draining", signal.Signals(signum).name)
            os._exit(EXIT_FAILURE)
        log.warning(
            "%s received: finishing in-flight work, then stopping", signal.Signals(signum).name
        )
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


Serve = Callable[[Redis, asyncio.Event, Probes], Coroutine[Any, Any, None]]


async def serve_with_redis(
    settings: Settings, serve: Serve, part: str = "", *, probed: bool = True
) -> int:
    """Wait for Redis, run `serve` until SIGINT/SIGTERM sets the stop event, disconnect.
    With `probed`, metrics and probes are served on CHATBOT_METRICS_PORT meanwhile."""
    stop = asyncio.Event()
    install_stop_handlers(stop)
    parts = [part] if part else []
    async with (
        serve_probes(settings, stop, parts, serve=probed) as probes,
        redis_session(settings, wait=stop) as redis,
    ):
        probes.connected(redis)
        await serve(redis, stop, probes)
    return 0


async def serve_worker(
    settings: Settings, redis: Redis, stop: asyncio.Event, probes: Probes | None = None
) -> None:
    """Load the model (in a thread, so the event loop keeps serving), then work until `stop`."""
    from core.knowledge.embeddings import load_embedder
    from core.knowledge.retrieval import Retriever
    from core.knowledge.store import KnowledgeBaseStore
    from core.worker import Worker

    if probes is not None:
        probes.check("worker", waiting("the model is not loaded yet"))
    engine, loader, model = await _open_engine(settings, redis)
    loop = asyncio.get_running_loop()
    try:
        embedder = await loop.run_in_executor(engine.executor, load_embedder, None, engine.executor)
    except BaseException:
        engine.close()
        raise
    retriever = Retriever(KnowledgeBaseStore(redis, Keys(settings.namespace)), embedder)
    worker = Worker(redis, settings, engine, retriever=retriever, loader=loader, model=model)
    if probes is not None:
        probes.check("worker", reading_jobs(worker.queue))
    with frozen_start_up():  # the model and the imports, out of the collector's way
        run = asyncio.create_task(worker.run())
        stop_wait = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({run, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            worker.stop()
            await run  # drains the batch in hand
        finally:
            stop_wait.cancel()
            worker.engine.close()  # the one it serves now: a promoted model may have replaced it


async def _open_engine(settings: Settings, redis: Redis) -> tuple[Any, Any, str]:
    """The engine to serve (remote, or local: the promoted model before CHATBOT_MODEL), the
    loader of promoted models (None for a remote engine) and the model's name."""
    from core.generation.transformers_engine import open_engine

    engine: Any
    if settings.engine_url:
        from core.generation.remote_engine import load_remote_engine
        from core.generation.transformers_engine import engine_thread

        executor = engine_thread()  # the tokenizer and the embedder load and run here
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(executor, load_remote_engine, settings, progress)
        engine.executor = executor
        log.info("generating with the engine at %s", settings.engine_url)
        if settings.watermark_key:
            log.warning(
                "CHATBOT_WATERMARK_KEY is set, but replies from CHATBOT_ENGINE_URL cannot be "
                "watermarked (only the local engine applies the watermark)"
            )
        return engine, None, settings.model
    from core.generation.transformers_engine import LocalEngines
    from core.training.registry import ModelRegistry

    # A model promoted with `chatbot model promote` comes before CHATBOT_MODEL.
    promoted = await with_retry(
        "reading the promoted model", ModelRegistry(redis, Keys(settings.namespace)).current
    )
    model = promoted.path if promoted else settings.model
    if promoted:
        log.info("serving the promoted model %s (promoted by %s)", model, promoted.by)
    engine = await open_engine(dataclasses.replace(settings, model=model), progress)
    return engine, LocalEngines(settings, engine.executor, progress), model


async def serve_slack(
    settings: Settings, redis: Redis, stop: asyncio.Event, port: int, probes: Probes | None = None
) -> None:
    from bot.slack import SlackAdapter

    if probes is not None:
        probes.check("slack", outbox_group(redis, Keys(settings.namespace), "slack"))
    adapter = SlackAdapter(redis, settings)
    with frozen_start_up():
        await adapter.serve(stop, port=port)


async def serve_discord(
    settings: Settings, redis: Redis, stop: asyncio.Event, probes: Probes | None = None
) -> None:
    from bot.discord import DiscordAdapter

    adapter = DiscordAdapter(redis, settings)
    if probes is not None:
        outbox_ready = outbox_group(redis, Keys(settings.namespace), "discord")

        async def ready() -> str | None:
            if not adapter.client.is_ready():
                return "not connected to the Discord gateway yet"
            return await outbox_ready()

        probes.check("discord", ready)
    with frozen_start_up():
        await adapter.serve(stop)


async def serve_console(
    settings: Settings, redis: Redis, stop: asyncio.Event, conversation: str
) -> None:
    from bot.console import ConsoleChat

    await ConsoleChat(redis, settings, conversation=conversation).run(stop)


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    return await serve_with_redis(
        settings, lambda r, s, p: serve_worker(settings, r, s, p), "worker"
    )


async def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    # A terminal client, not a service: no metrics port (it would clash with `chatbot run`'s).
    return await serve_with_redis(
        settings, lambda r, s, p: serve_console(settings, r, s, args.conversation), probed=False
    )


async def cmd_slack(settings: Settings, args: argparse.Namespace) -> int:
    return await serve_with_redis(
        settings, lambda r, s, p: serve_slack(settings, r, s, args.port, p), "slack"
    )


async def cmd_discord(settings: Settings, args: argparse.Namespace) -> int:
    if args.invite_url:
        from bot.discord import invite_url

        if not settings.discord_token:
            raise SettingsError("DISCORD_TOKEN is not set: the invite URL is made from it")
        print(invite_url(settings.discord_token))
        return 0
    return await serve_with_redis(
        settings, lambda r, s, p: serve_discord(settings, r, s, p), "discord"
    )


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded Redis (unless REDIS_URL), a worker, the configured adapters or the console;
    when one part ends (the console at end of input, or a failure), the rest stop. They
    are tasks of this one process, which serves one metrics port for them all."""
    stop = asyncio.Event()
    install_stop_handlers(stop)
    configured = {"slack": settings.slack_configured, "discord": settings.discord_configured}
    adapters = [name for name, on in configured.items() if on]
    async with (
        serve_probes(settings, stop, ["worker", *adapters]) as probes,
        redis_session(settings, embedded=Embedded.SERVE, wait=stop) as redis,
    ):
        probes.connected(redis)
        for path in args.ingest:
            progress(await ingest(settings, redis, Path(path), settings.kb, prune=True))
        parts: dict[str, Coroutine[Any, Any, None]] = {
            "worker": serve_worker(settings, redis, stop, probes)
        }
        if settings.slack_configured:
            parts["slack"] = serve_slack(settings, redis, stop, args.slack_port, probes)
        if settings.discord_configured:
            parts["discord"] = serve_discord(settings, redis, stop, probes)
        if not (settings.slack_configured or settings.discord_configured):
            parts["console"] = serve_console(settings, redis, stop, args.conversation)
        await _run_together(parts, stop)
    return 0


async def _run_together(parts: dict[str, Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
    tasks = [asyncio.create_task(part, name=name) for name, part in parts.items()]
    stop_wait = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                raise result
    finally:
        stop.set()
        for task in [*tasks, stop_wait]:
            task.cancel()
        await asyncio.gather(*tasks, stop_wait, return_exceptions=True)
