"""The `chatbot` command: run, worker, chat, slack, discord (`bot.serve`), health,
prepare-model, the operator commands of `bot.admin` (kb, workspace, stats,
conversation, user, handoff), and `watermark detect` (`bot.watermark`).

Only what a command needs is imported: torch and transformers load in the worker and in
`prepare-model`, never for an adapter or an operator command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bot.admin import add_admin_commands
from bot.redis_session import known_redis_url, redis_session
from bot.serve import cmd_chat, cmd_discord, cmd_run, cmd_slack, cmd_worker, progress
from bot.training import add_training_commands
from bot.watermark import DetectInputError, add_watermark_commands
from core.errors import (
    ChatbotError,
    DataError,
    ModelLoadError,
    RedisServerError,
    SettingsError,
)
from core.health import check_health
from core.keys import Keys
from core.knowledge.documents import KnowledgeBaseError
from core.logs import log_formatter
from core.pii import install_log_masking
from core.redis_checks import server_config_findings
from core.redis_conn import TRANSIENT_ERRORS, mask_url
from core.settings import Settings

log = logging.getLogger("chatbot")

# Loggers that write request and response bodies at DEBUG.
PLATFORM_LOGGERS = ("slack_sdk", "slack_bolt", "discord.http", "discord.gateway", "aiohttp")
EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _setup_logging(settings: Settings, *, quiet_console: bool) -> None:
    """Log to stderr; when a chat shares the terminal, full logs go to a file instead."""
    formatter = log_formatter(settings.log_format)
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    if quiet_console:
        stderr.setLevel(logging.WARNING)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(settings.data_dir / "chatbot.log")
        to_file.setFormatter(formatter)
        root.addHandler(to_file)
    root.addHandler(stderr)
    # Customers' e-mail addresses, phone and card numbers never reach the log.
    install_log_masking(root)
    for noisy in ("httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not settings.log_platform_bodies:
        for library in PLATFORM_LOGGERS:
            logging.getLogger(library).setLevel(max(logging.INFO, root.level))


async def cmd_prepare_model(settings: Settings, args: argparse.Namespace) -> int:
    from core.generation.model_files import prepare_model

    source, location = await asyncio.to_thread(
        prepare_model, settings.model, settings.cache_dir, progress
    )
    print(f"{source.label} is ready at {location}")
    return 0


async def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when Redis answers and at least one worker is alive: for probes and operators."""
    async with redis_session(settings, check=False) as redis:
        try:
            health = await check_health(redis, Keys(settings.namespace))
            for finding in await server_config_findings(redis):  # eviction, persistence
                print(f"warning: {finding}", file=sys.stderr)
        except TRANSIENT_ERRORS as exc:
            where = mask_url(known_redis_url(settings) or "")
            print(f"unhealthy: Redis at {where} is unreachable ({exc})", file=sys.stderr)
            return EXIT_FAILURE
    print(health.to_json())
    for worker in health.workers:
        status = str(worker.get("watermark", ""))
        if status.startswith("unavailable"):
            name = worker.get("consumer", "?")
            print(f"warning: worker {name}: watermark {status}", file=sys.stderr)
    if not health.ok:
        print("unhealthy: no live worker", file=sys.stderr)
    return 0 if health.ok else EXIT_FAILURE


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
    add_watermark_commands(sub)
    add_training_commands(sub)
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
    except (KnowledgeBaseError, DetectInputError, DataError) as exc:
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
