"""Discord REST calls counted in `core.metrics`: those that failed, and those retried.

discord.py retries inside `HTTPClient.request` (rate limits, 5xx, connection resets), out of
sight; an aiohttp trace counts the HTTP attempts each call made, and every attempt after the
first is a retry. Calls are labelled by route template ("POST /channels/{channel_id}/messages"),
which keeps the label's values few.
"""

from __future__ import annotations

from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord

from core import metrics

PLATFORM = "discord"

_attempts: ContextVar[list[int] | None] = ContextVar("discord_http_attempts", default=None)


def http_trace() -> aiohttp.TraceConfig:
    """The trace to give `discord.Client(http_trace=...)`: counts the current call's attempts."""

    async def on_request_start(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
    ) -> None:
        attempts = _attempts.get()
        if attempts is not None:
            attempts[0] += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    return trace


def count_calls(http: discord.http.HTTPClient) -> None:
    """Count the failed and the retried calls `http` makes from now on."""
    request = http.request

    async def counted(route: discord.http.Route, **kwargs: Any) -> Any:
        attempts = [0]
        token = _attempts.set(attempts)
        method = f"{route.method} {route.path}"
        try:
            return await request(route, **kwargs)
        except Exception:
            metrics.api_error(PLATFORM, method)
            raise
        finally:
            _attempts.reset(token)
            for _ in range(attempts[0] - 1):
                metrics.api_retry(PLATFORM, method)

    http.request = counted  # type: ignore[method-assign]
