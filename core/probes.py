"""`/metrics`, `/healthz` and `/readyz` on `CHATBOT_METRICS_PORT`, for Prometheus and for the
probes of an orchestrator (Kubernetes, compose health checks).

- `/healthz`: 200 while the process's event loop runs (it is what answers).
- `/readyz`: 200 when every part of the process is ready, else 503; both with a JSON body
  `{"ready": bool, "checks": {name: "ok" | why not}}`. Always checked: Redis answers, and
  the process is not stopping (SIGTERM: in-flight work drains, new traffic should go
  elsewhere). A worker is ready once its model is loaded and it has joined the job
  consumer group; an adapter once its outbox consumer group exists (Discord: and it has
  connected to the gateway). `chatbot run` is one process
  with one server: its parts' checks all count.
- `/metrics`: the process's metrics (`core.metrics`), the queue gauges read from Redis
  first, in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.exceptions import RedisError, ResponseError

from core.errors import SettingsError
from core.jobs import JobQueue
from core.keys import Keys, adapter_group
from core.metrics import sample_queue
from core.redis_conn import Redis
from core.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
# A check: None when ready, else why not (said in /readyz's body).
Check = Callable[[], Awaitable[str | None]]


def waiting(why: str) -> Check:
    """A check that is not ready, for `why` (a part still starting)."""

    async def check() -> str | None:
        return why

    return check


def reading_jobs(queue: JobQueue) -> Check:
    """Ready once the worker has joined the job consumer group: it announces itself
    (`core.liveness`, what `chatbot health` lists) right after, and its heartbeat keeps
    the record, which expires when the heartbeat stops."""

    async def check() -> str | None:
        if await queue.redis.exists(queue.keys.worker(queue.consumer)):
            return None
        return "not in the job consumer group yet"

    return check


def outbox_group(redis: Redis, keys: Keys, platform: str) -> Check:
    """Ready once the platform's outbox consumer group exists (the adapter created it)."""

    async def check() -> str | None:
        try:
            groups: Any = await redis.xinfo_groups(keys.outbox(platform))
        except ResponseError:  # no outbox stream yet
            groups = []
        if any(g["name"] == adapter_group(platform) for g in groups):
            return None
        return f"the {platform} outbox consumer group is not joined yet"

    return check


class Probes:
    """What the probes report for one process: its parts' readiness checks, and its Redis."""

    def __init__(
        self, settings: Settings, stop: asyncio.Event | None = None, parts: Iterable[str] = ()
    ) -> None:
        self.keys = Keys(settings.namespace)
        self.stop = stop
        self.redis: Redis | None = None
        self._checks: dict[str, Check] = {part: waiting("not started yet") for part in parts}

    def connected(self, redis: Redis) -> None:
        self.redis = redis

    def check(self, part: str, check: Check) -> None:
        """From now on `part` is ready when `check` says so (replacing its last check)."""
        self._checks[part] = check

    async def readiness(self) -> dict[str, str]:
        """Every check's answer: "ok" or why not."""
        results = {"redis": await self._answer(self._redis_check)}
        for part, check in list(self._checks.items()):
            results[part] = await self._answer(check)
        if self.stop is not None and self.stop.is_set():
            results["process"] = "stopping"
        return results

    async def _redis_check(self) -> str | None:
        if self.redis is None:
            return "not connected yet"
        await self.redis.ping()
        return None

    async def _answer(self, check: Check) -> str:
        try:
            why = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:.0f} s"
        except (RedisError, OSError) as exc:
            return f"Redis: {exc}"
        return why or "ok"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self.readiness()
        ready = all(answer == "ok" for answer in checks.values())
        body = json.dumps({"ready": ready, "checks": checks})
        return web.Response(
            text=body, status=200 if ready else 503, content_type="application/json"
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.redis is not None:
            try:
                await asyncio.wait_for(sample_queue(self.redis, self.keys), CHECK_TIMEOUT_S)
            except (TimeoutError, RedisError, OSError) as exc:  # the rest is still worth it
                log.warning("could not read the queue depth for /metrics: %s", exc)
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


@asynccontextmanager
async def serve_probes(
    settings: Settings,
    stop: asyncio.Event | None = None,
    parts: Iterable[str] = (),
    *,
    serve: bool = True,
) -> AsyncIterator[Probes]:
    """The process's `Probes`, served on `CHATBOT_METRICS_PORT` (when set, and `serve`)
    while the block runs."""
    probes = Probes(settings, stop, parts)
    port = settings.metrics_port
    if port is None or not serve:
        yield probes
        return
    runner = web.AppRunner(probes.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, port=port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SettingsError(f"CHATBOT_METRICS_PORT={port}: cannot listen there ({exc})") from exc
    log.info("metrics at :%d/metrics, probes at /healthz and /readyz", port)
    try:
        yield probes
    finally:
        await runner.cleanup()
