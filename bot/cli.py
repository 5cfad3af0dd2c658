"""The `chatbot` command: run, worker, chat, slack, discord, health, prepare-model, and the
operator commands of `bot.admin` (kb, workspace, stats, conversation, user, handoff)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bot.admin import add_admin_commands, ingest, known_redis_url, url_file
from bot.console import ConsoleChat
from bot.discord.adapter import DiscordAdapter, invite_url
from bot.slack.adapter import SlackAdapter
from core.knowledge.embeddings import load_embedder
from core.errors import ChatbotError, ModelLoadError, RedisServerError, SettingsError
from core.health import check_health
from core.generation.transformers_engine import open_engine
from core.knowledge.store import KnowledgeBaseError, KnowledgeBaseStore
from core.keys import Keys
from core.generation.model_files import prepare_model
from core.pii import install_log_masking
from core.redis_conn import TRANSIENT_ERRORS, Redis, connect, mask_url, with_retry
from core.redis_server import RedisServer
from core.knowledge.retrieval import Retriever
from core.settings import Settings
from core.worker import Worker

log = logging.getLogger("chatbot")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _setup_logging(settings: Settings, *, quiet_console: bool) -> None:
    """Log to stderr; when a chat shares the terminal, full logs go to a file instead."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(fmt))
    if quiet_console:
        stderr.setLevel(logging.WARNING)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(settings.data_dir / "chatbot.log")
        to_file.setFormatter(logging.Formatter(fmt))
        root.addHandler(to_file)
    root.addHandler(stderr)
    # Customers' e-mail addresses, phone and card numbers never reach the log.
    install_log_masking(root)
    for noisy in ("httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _redis_url(settings: Settings) -> str:
    """REDIS_URL, else the embedded server a running `chatbot run` announced."""
    url = known_redis_url(settings)
    if url is None:
        raise SettingsError(
            "REDIS_URL is not set and no `chatbot run` is running here: set REDIS_URL "
            "(e.g. redis://localhost:6379/0) or start `chatbot run` first"
        )
    return url


def _install_stop_handlers(stop: asyncio.Event) -> None:
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


async def _serve_with_redis(
    settings: Settings, serve: Callable[[Redis, asyncio.Event], Coroutine[Any, Any, None]]
) -> int:
    """Connect to Redis, run `serve` until SIGINT/SIGTERM sets the stop event, disconnect."""
    stop = asyncio.Event()
    _install_stop_handlers(stop)
    url = _redis_url(settings)
    redis = connect(url)
    try:
        await _check_redis(redis, url, stop)
        await serve(redis, stop)
    finally:
        await redis.aclose()
    return 0


async def _check_redis(redis: Redis, url: str, stop: asyncio.Event) -> None:
    log.info("connecting to Redis at %s", mask_url(url))
    await with_retry(f"connecting to {mask_url(url)}", redis.ping, stop=stop)


async def _serve_worker(settings: Settings, redis: Redis, stop: asyncio.Event) -> None:
    """Load the model (in a thread, so the event loop keeps serving), then work until `stop`."""
    engine = await open_engine(settings, _progress)
    loop = asyncio.get_running_loop()
    try:
        embedder = await loop.run_in_executor(engine.executor, load_embedder, None, engine.executor)
    except BaseException:
        engine.close()
        raise
    retriever = Retriever(KnowledgeBaseStore(redis, Keys(settings.namespace)), embedder)
    worker = Worker(redis, settings, engine, retriever=retriever)
    run = asyncio.create_task(worker.run())
    stop_wait = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({run, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        await run  # drains the batch in hand
    finally:
        stop_wait.cancel()
        engine.close()


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    async def serve(redis: Redis, stop: asyncio.Event) -> None:
        await _serve_worker(settings, redis, stop)

    return await _serve_with_redis(settings, serve)


async def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    async def serve(redis: Redis, stop: asyncio.Event) -> None:
        await ConsoleChat(redis, settings, conversation=args.conversation).run(stop)

    return await _serve_with_redis(settings, serve)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _install_stop_handlers(stop)
    server: RedisServer | None = None
    if settings.redis_url:
        url = settings.redis_url
    else:
        server = RedisServer(settings.data_dir / "redis")
        url = await asyncio.to_thread(server.start)
        url_file(settings).write_text(url + "\n")
    redis = connect(url)
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        await _check_redis(redis, url, stop)
        for path in args.ingest:
            _progress(await ingest(settings, redis, Path(path), settings.kb, prune=True))
        tasks["worker"] = asyncio.create_task(_serve_worker(settings, redis, stop))
        if settings.slack_configured:
            tasks["slack"] = asyncio.create_task(
                SlackAdapter(redis, settings).serve(stop, port=args.slack_port)
            )
        if settings.discord_configured:
            tasks["discord"] = asyncio.create_task(DiscordAdapter(redis, settings).serve(stop))
        if not (settings.slack_configured or settings.discord_configured):
            chat = ConsoleChat(redis, settings, conversation=args.conversation)
            tasks["console"] = asyncio.create_task(chat.run(stop))
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({*tasks.values(), stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # one part ended (console at end of input, or a failure): stop the rest
        for result in await asyncio.gather(*tasks.values(), return_exceptions=True):
            if isinstance(result, Exception):
                raise result
    finally:
        stop.set()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await redis.aclose()
        if server is not None:
            with contextlib.suppress(OSError):
                url_file(settings).unlink()
            await asyncio.to_thread(server.stop)
    return 0


async def cmd_prepare_model(settings: Settings, args: argparse.Namespace) -> int:
    source, location = await asyncio.to_thread(
        prepare_model, settings.model, settings.cache_dir, _progress
    )
    print(f"{source.label} is ready at {location}")
    return 0


async def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when Redis answers and at least one worker is alive: for probes and operators."""
    url = _redis_url(settings)
    redis = connect(url)
    try:
        health = await check_health(redis, Keys(settings.namespace))
    except TRANSIENT_ERRORS as exc:
        print(f"unhealthy: Redis at {mask_url(url)} is unreachable ({exc})", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await redis.aclose()
    print(health.to_json())
    if not health.ok:
        print("unhealthy: no live worker", file=sys.stderr)
    return 0 if health.ok else EXIT_FAILURE


async def cmd_slack(settings: Settings, args: argparse.Namespace) -> int:
    async def serve(redis: Redis, stop: asyncio.Event) -> None:
        await SlackAdapter(redis, settings).serve(stop, port=args.port)

    return await _serve_with_redis(settings, serve)


async def cmd_discord(settings: Settings, args: argparse.Namespace) -> int:
    if args.invite_url:
        if not settings.discord_token:
            raise SettingsError("DISCORD_TOKEN is not set: the invite URL is made from it")
        print(invite_url(settings.discord_token))
        return 0

    async def serve(redis: Redis, stop: asyncio.Event) -> None:
        await DiscordAdapter(redis, settings).serve(stop)

    return await _serve_with_redis(settings, serve)


Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

COMMANDS: dict[str, tuple[Command, str]] = {
    "run": (cmd_run, "everything in one process group: Redis, a worker, the adapters, the console"),
    "worker": (cmd_worker, "a generation worker"),
    "chat": (cmd_chat, "talk to the bot in the terminal (pipe lines in to script it)"),
    "slack": (cmd_slack, "the Slack adapter: Events API on --port, or Socket Mode"),
    "discord": (cmd_discord, "the Discord adapter (--invite-url prints the invite link)"),
    "health": (cmd_health, "report Redis, live workers and queue depth; exit 1 if unhealthy"),
    "prepare-model": (cmd_prepare_model, "convert and cache the configured model, then exit"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbot", description="A customer-service chatbot for Discord and Slack."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("run", "chat"):
            command.add_argument(
                "--conversation",
                default="default",
                help="name of the console conversation to continue (default: %(default)s)",
            )
        if name == "slack":
            command.add_argument(
                "--port", type=int, default=3000, help="Events API port (default: %(default)s)"
            )
        if name == "discord":
            command.add_argument(
                "--invite-url",
                action="store_true",
                help="print the URL that adds the bot to a server, with the permissions it needs",
            )
        if name == "run":
            command.add_argument(
                "--slack-port",
                type=int,
                default=3000,
                help="Slack Events API port, when Slack is configured (default: %(default)s)",
            )
            command.add_argument(
                "--ingest",
                action="append",
                default=[],
                metavar="PATH",
                help="first bring the knowledge base (CHATBOT_KB) in line with this folder",
            )
    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatbot: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(settings, quiet_console=args.command in ("run", "chat"))
    handler: Command = getattr(args, "handler", None) or COMMANDS[args.command][0]
    try:
        return asyncio.run(handler(settings, args))
    except SettingsError as exc:
        print(f"chatbot: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KnowledgeBaseError as exc:
        print(f"chatbot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ModelLoadError, RedisServerError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except ChatbotError as exc:
        log.exception("stopped: %s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
