"""Connecting to Redis, and the one way this project waits out an unreachable Redis.

`Backoff` is the only retry policy: `with_retry` retries one call with it, and the long
running loops (the worker, the outbox consumers) use it between failed steps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.redis_batching import Batching
from core.redis_url import RedisTarget, Topology, parse_redis_url

log = logging.getLogger(__name__)

T = TypeVar("T")
Redis = aioredis.Redis
# Redis Cluster adds its own: a slot whose primary is failing over (CLUSTERDOWN, TRYAGAIN,
# a slot no node serves for a moment).
TRANSIENT_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)
# Above every BLOCK this project asks of XREAD/XREADGROUP (1 s at most): a blocking read
# must end before the socket gives up on it (redis-py 8 defaults to 5 s).
SOCKET_TIMEOUT_S = 10.0
# Replies that mean "this node is no longer the master you wanted": a master demoted in a
# failover ends the blocking reads on it with UNBLOCKED (XREADGROUP BLOCK, BLPOP…); one whose
# replica left it refuses writes with NOREPLICAS under `min-replicas-to-write`. Both are
# taken as a lost connection, so the retries find the new master.
MASTER_MOVED_REPLIES = ("UNBLOCKED", "NOREPLICAS")


def master_moved(exc: ResponseError) -> bool:
    return str(exc).startswith(MASTER_MOVED_REPLIES)


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
    """A client that decodes strings; it connects lazily, so this never blocks.

    `url` is any form `core.redis_url` reads: one Redis, a master behind Sentinel (the
    client asks the sentinels where the master is whenever it connects, so after a failover
    it finds the new one), or a Redis Cluster (a `RedisCluster`, typed here as `Redis`:
    it takes the same commands, each routed to the node holding its keys' slot). A
    malformed URL raises SettingsError.
    """
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_keepalive": True,
    }
    if target.topology is Topology.SENTINEL:
        return _sentinel_master(target, options)
    if target.topology is Topology.CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        cluster = _Cluster(
            startup_nodes=nodes, username=target.username, password=target.password, **options
        )
        return cast(Redis, cluster)
    return Batching.from_url(url, **options)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


class _Cluster(RedisCluster):
    """A RedisCluster whose "no start-up node answers" is a ConnectionError, like any
    other unreachable Redis, so that the retries wait for the cluster to come up."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py 8.1 closes every connection of the client on CLUSTERDOWN, also those
        # other tasks are writing on: their write then fails with AttributeError or
        # TypeError instead of ConnectionError (redis-py issues 3546, 4287). It is one.
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, TypeError) as exc:
            if not _raised_in_redis_connection(exc):
                raise
            raise RedisConnectionError(f"connection closed during a write ({exc})") from exc
        except ResponseError as exc:
            # A failover demoted the node under a blocking read; the next command is
            # redirected (MOVED) to the slot's new primary.
            if not master_moved(exc):
                raise
            raise RedisConnectionError(f"the node stopped being a primary: {exc}") from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py finds the keys of XREAD and XREADGROUP by asking a node (COMMAND GETKEYS)
        # before every call: the node it picked when it last read the whole topology. That
        # question is asked before the command's retries and refreshes, so once that node
        # died (a primary SIGKILLed) every read failed with ConnectionError for as long as
        # nothing else re-read the topology: an outbox consumer or a worker stuck for
        # minutes after the failover. Their keys are found here instead, with no round trip.
        keys = stream_read_keys(command, args)
        if keys:
            slots = {self.keyslot(key) for key in keys}
            if len(slots) == 1:
                return slots.pop()
        try:
            return await super()._determine_slot(command, *args)
        except TRANSIENT_ERRORS:
            # Another command whose keys only a node can tell: ask the current default
            # node next time (the topology's refresh moves it off a dead node).
            self.commands_parser.node = self.get_default_node()
            raise

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            if isinstance(exc.__cause__, TRANSIENT_ERRORS):
                raise RedisConnectionError(str(exc)) from exc
            raise


def stream_read_keys(command: str, args: tuple[Any, ...]) -> list[Any]:
    """The stream keys of an XREAD or XREADGROUP call (the first half of what follows
    STREAMS); an empty list for any other command or a call it cannot read."""
    if str(command).upper() not in ("XREAD", "XREADGROUP"):
        return []
    i = 0
    while i < len(args):
        word = args[i].decode() if isinstance(args[i], bytes) else str(args[i])
        word = word.upper()
        if word == "STREAMS":
            rest = args[i + 1 :]
            return list(rest[: len(rest) // 2]) if len(rest) % 2 == 0 else []
        i += {"GROUP": 3, "COUNT": 2, "BLOCK": 2, "NOACK": 1}.get(word, len(args))
    return []


def _raised_in_redis_connection(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith(
        ("redis/asyncio/connection.py", "asyncio/streams.py", "asyncio/selector_events.py")
    )


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master Sentinel named. A master whose replica has left it
    (promoted in a failover) refuses writes with NOREPLICAS when it is configured with
    `min-replicas-to-write`, and a demoted master ends blocking reads with UNBLOCKED: both
    are taken, like READONLY, as "the master moved", so the retry asks the sentinels again
    instead of writing where the writes would be lost."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not master_moved(exc):
                raise
            await self.disconnect()
            raise RedisConnectionError(f"the master refused a write: {exc}") from exc


class SentinelMaster(Batching):
    """The master's client; closing it closes its connections to the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def _sentinel_master(target: RedisTarget, options: dict[str, Any]) -> Redis:
    # Typed through Any: redis-py's annotations of Sentinel.__init__ differ between releases.
    sentinel_class: Any = Sentinel
    sentinel: Sentinel = sentinel_class(list(target.nodes), **options)
    master: SentinelMaster = sentinel.master_for(
        target.master,
        redis_class=SentinelMaster,
        connection_class=_MasterConnection,
        db=target.db,
        username=target.username,
        password=target.password,
    )
    master.sentinel_manager = sentinel
    return master


def cancellation_lost() -> bool:
    """Whether the running task was asked to stop and still runs. A cancellation can be lost
    inside a redis-py call: redis-py waits with `asyncio.wait_for`, which in Python 3.11
    returns the result when it comes at the moment of the cancellation. A loop that only
    cancellation stops checks this after its Redis calls."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
