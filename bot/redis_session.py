"""The Redis a command talks to: found, started if need be, checked and closed in one place.

Which Redis: `REDIS_URL`; else the embedded server that a running `chatbot run` announced
in its data directory; else, for commands that may, an embedded server of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from enum import StrEnum
from pathlib import Path

from core.errors import SettingsError
from core.redis_checks import log_server_config
from core.redis_conn import TRANSIENT_ERRORS, Redis, connect, mask_url, with_retry
from core.redis_server import RedisServer
from core.settings import Settings

log = logging.getLogger(__name__)


class Embedded(StrEnum):
    NEVER = "never"  # REDIS_URL or a running `chatbot run`, else a configuration error
    FOR_COMMAND = "for_command"  # else start the embedded server for this command only
    SERVE = "serve"  # `chatbot run`: REDIS_URL, else start it and announce it to others


def url_file(settings: Settings) -> Path:
    """Where `chatbot run` announces the URL of its embedded Redis."""
    return settings.data_dir / "redis.url"


def known_redis_url(settings: Settings) -> str | None:
    """REDIS_URL, else the embedded server a running `chatbot run` announced, else None."""
    if settings.redis_url:
        return settings.redis_url
    announced = url_file(settings)
    return announced.read_text().strip() if announced.is_file() else None


@contextlib.asynccontextmanager
async def redis_session(
    settings: Settings,
    *,
    embedded: Embedded = Embedded.NEVER,
    wait: asyncio.Event | None = None,
    check: bool = True,
) -> AsyncIterator[Redis]:
    """A connected client for the length of the block.

    `wait`: keep retrying until Redis answers or this event is set (services); without it
    one failed PING is a `SettingsError` (operator commands). `check=False`: no PING at
    all (the caller reports reachability itself).
    """
    async with contextlib.AsyncExitStack() as stack:
        url = await _find_or_start(settings, embedded, stack)
        redis = connect(url)
        stack.push_async_callback(redis.aclose)
        if wait is not None:
            log.info("connecting to Redis at %s", mask_url(url))
            await with_retry(f"connecting to {mask_url(url)}", redis.ping, stop=wait)
            await log_server_config(redis)  # warns when streams could be evicted or lost
        elif check:
            try:
                await redis.ping()
            except TRANSIENT_ERRORS as exc:
                raise SettingsError(f"cannot reach Redis at {mask_url(url)}: {exc}") from exc
        yield redis


async def _find_or_start(
    settings: Settings, embedded: Embedded, stack: contextlib.AsyncExitStack
) -> str:
    url = settings.redis_url if embedded is Embedded.SERVE else known_redis_url(settings)
    if url:
        return url
    if embedded is Embedded.NEVER:
        raise SettingsError(
            "REDIS_URL is not set and no `chatbot run` is running here: set REDIS_URL "
            "(e.g. redis://localhost:6379/0) or start `chatbot run` first"
        )
    server = RedisServer(settings.data_dir / "redis")
    url = await asyncio.to_thread(server.start)
    stack.push_async_callback(asyncio.to_thread, server.stop)
    if embedded is Embedded.SERVE:
        announced = url_file(settings)  # it holds the password: for this user's eyes only
        announced.unlink(missing_ok=True)
        fd = os.open(announced, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(url + "\n")
        stack.callback(announced.unlink, missing_ok=True)
    return url
