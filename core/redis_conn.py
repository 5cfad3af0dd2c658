"""Connecting to Redis, and the one way this project waits out an unreachable Redis.

`Backoff` is the only retry policy: `with_retry` retries one call with it, and the long
running loops (the worker, the outbox consumers) use it between failed steps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")
Redis = aioredis.Redis
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def backoff_s(failures: int, cap_s: float = 10.0) -> float:
    """Seconds to wait after `failures` consecutive failures: 0.4, 0.8, 1.6 … capped."""
    return min(0.2 * 2.0**failures, cap_s)


class Backoff:
    """Consecutive failures of one activity, each logged and followed by a growing wait."""

    def __init__(self, what: str, cap_s: float = 10.0) -> None:
        self.what = what
        self.cap_s = cap_s
        self.failures = 0

    async def failed(self, exc: BaseException) -> None:
        """Log the failure and wait before the next attempt."""
        self.failures += 1
        wait_s = backoff_s(self.failures, self.cap_s)
        log.warning(
            "Redis unreachable while %s (%s: %s); retrying in %.1f s (attempt %d)",
            self.what,
            type(exc).__name__,
            exc,
            wait_s,
            self.failures,
        )
        await asyncio.sleep(wait_s)

    def succeeded(self) -> None:
        if self.failures:
            log.info(
                "Redis reachable again; %s succeeded after %d retries", self.what, self.failures
            )
        self.failures = 0


def mask_url(url: str) -> str:
    """The URL with any password replaced, for log lines."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str) -> Redis:
    """A client that decodes strings; it connects lazily, so this never blocks."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=15,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )


async def with_retry(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    stop: asyncio.Event | None = None,
    give_up_at: float | None = None,
    max_wait_s: float = 10.0,
) -> T:
    """Run `call` until Redis answers, backing off exponentially, logging each failure.

    Gives up when `stop` is set (shutdown) or when the next attempt would come after
    `give_up_at` (a `time.monotonic()` value); then the last error is raised.
    """
    backoff = Backoff(what, max_wait_s)
    while True:
        try:
            result = await call()
        except TRANSIENT_ERRORS as exc:
            if stop is not None and stop.is_set():
                raise
            next_try = time.monotonic() + backoff_s(backoff.failures + 1, max_wait_s)
            if give_up_at is not None and next_try > give_up_at:
                log.warning("Redis unreachable while %s (%s); giving up", what, exc)
                raise
            await backoff.failed(exc)
            continue
        backoff.succeeded()
        return result
