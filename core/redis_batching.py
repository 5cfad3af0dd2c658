"""Commands that tasks send at the same moment travel to Redis together.

A burst of messages makes many tasks (one per message, in the adapters and in the worker)
each wait on Redis for a command of their own. Sent one by one, each command costs its own
write, its own read and its own wake-up of the event loop: about 55 µs of this process's
time apiece on the 2-core machine of the benchmarks, against about 10 µs for a command
sent in a pipeline. `Batching` collects the commands that tasks issue in the same turn of
the event loop and sends them as one non-transactional pipeline; each task gets its own
reply or its own error, as if it had sent its command alone:

- nothing waits for company: the first command of a turn yields to the event loop once
  (the tasks ready in that turn add theirs), then goes, alone when no other came;
- a command's error (a `ResponseError`, NOSCRIPT for a script that must be loaded again)
  is that command's only; a lost connection fails every command of the pipeline, as it
  would have failed each of them sent alone, and the callers retry (`with_retry`);
- a non-transactional `pipeline()`'s commands join those of the turn too; blocking
  commands (XREADGROUP BLOCK…) and transactions (MULTI/EXEC, WATCH) go as before, on a
  connection of their own;
- commands a caller issues one after the other still reach Redis in that order; the
  commands of `together(a, b)` go in one round trip, in the order of its arguments.

Redis Cluster keeps redis-py's own client (`core.redis_conn._Cluster`): a pipeline there is
split by node, and `together` only runs its steps side by side.

Measured with `bench/serving.py --overhead` (an instant engine, a burst of 2,000 messages,
A/B against the client without this in one sitting): 1.1-1.9x the messages/s, and a
quarter to a third of redis-server's CPU per message. See the README's performance section.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

# Commands that may wait on the server: never in a pipeline with others (they would hold
# every reply behind them).
BLOCKING = frozenset(
    {
        "BLPOP",
        "BRPOP",
        "BLMOVE",
        "BRPOPLPUSH",
        "BLMPOP",
        "BZPOPMIN",
        "BZPOPMAX",
        "BZMPOP",
        "WAIT",
        "WAITAOF",
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "MONITOR",
    }
)


def may_batch(args: tuple[Any, ...]) -> bool:
    """Whether a command may share a pipeline: not one that blocks on the server."""
    if not args:
        return False
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    name = name.upper()
    if name in BLOCKING:
        return False
    if name in ("XREAD", "XREADGROUP"):
        words = {
            (a.decode(errors="replace") if isinstance(a, bytes) else str(a)).upper()
            for a in args[1:]
        }
        return "BLOCK" not in words
    return True


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Each step's result, the steps run side by side: the commands they issue in the same
    turn go to Redis in one round trip, in the order of `steps`. A step that is itself a
    `together` issues its commands a turn later, in a round trip of their own: pass its
    steps here instead. The first error is raised once every step has ended, so that none
    is left running behind the caller (retrying, or holding a lock it took)."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def keeps_order(redis: Any) -> bool:
    """Whether the commands that `together`'s steps issue in their first turn reach Redis
    in the order of the steps (and are executed so): a `Batching` client sends them in
    one pipeline. Another client (a Cluster's) may send them side by side."""
    return isinstance(redis, Batching) and not redis.single_connection_client


class _Pending:
    __slots__ = ("args", "future", "options")

    def __init__(self, args: tuple[Any, ...], options: dict[str, Any], future: Any) -> None:
        self.args = args
        self.options = options
        self.future = future


class Batching(aioredis.Redis):
    """A Redis client that sends the commands of one event-loop turn as one pipeline."""

    _gathering: list[_Pending] | None = None
    _sending: set[asyncio.Task[None]] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.single_connection_client or not may_batch(args):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        mine = _Pending(args, options, asyncio.get_running_loop().create_future())
        if not await self._gather([mine]):  # alone in its turn: sent as it is
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await mine.future

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        """A pipeline; without a transaction, its commands join those of the same turn."""
        if transaction or self.single_connection_client:
            return super().pipeline(transaction, shard_hint)
        return _JoiningPipeline(self, shard_hint)

    async def _gather(self, entries: list[_Pending]) -> bool:
        """Add `entries` to this turn's commands; False when they went alone (the caller
        sends them), True when they were sent with others (their futures settle)."""
        gathering = self._gathering
        if gathering is not None:  # a command of this turn leads: go with it
            gathering.extend(entries)
            return True
        gathering = self._gathering = list(entries)
        try:
            await asyncio.sleep(0)  # the tasks ready in this turn add their commands
        except asyncio.CancelledError:
            self._stop_gathering(gathering)
            others = gathering[len(entries) :]
            if others:  # they still go
                self._launch(others)
            raise
        self._stop_gathering(gathering)
        if len(gathering) == len(entries):
            return False
        self._launch(gathering)
        return True

    def _stop_gathering(self, gathering: list[_Pending]) -> None:
        if self._gathering is gathering:
            self._gathering = None

    def _launch(self, batch: list[_Pending]) -> None:
        """Send `batch` in a task of its own: a caller cancelled meanwhile stops waiting
        for its reply, and the others still get theirs."""
        if self._sending is None:
            self._sending = set()
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            async with super().pipeline(transaction=False) as pipe:
                for pending in batch:
                    pipe.execute_command(*pending.args, **pending.options)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection, or this task cancelled (shutdown)
            for pending in batch:
                if pending.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    pending.future.cancel()
                else:
                    pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for pending, reply in zip(batch, replies, strict=True):
            if pending.future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                pending.future.set_exception(reply)
            else:
                pending.future.set_result(reply)


class _JoiningPipeline(Pipeline):
    """A non-transactional pipeline whose commands travel with the other commands of the
    same turn (`Batching`): one round trip for all, instead of one more per pipeline."""

    def __init__(self, client: Batching, shard_hint: str | None) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, False, shard_hint)
        self._client = client

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.scripts or self.watching or self.explicit_transaction or not self.command_stack:
            return await super().execute(raise_on_error)
        loop = asyncio.get_running_loop()
        entries = [
            _Pending(args, dict(options), loop.create_future())
            for args, options in self.command_stack
        ]
        try:
            if await self._client._gather(entries):
                replies: list[Any] = []
                for pending in entries:
                    try:
                        replies.append(await pending.future)
                    except Exception as exc:
                        replies.append(exc)
            else:  # alone in its turn: an ordinary pipeline
                return await super().execute(raise_on_error)
        finally:
            await self.reset()  # type: ignore[no-untyped-call]
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies
