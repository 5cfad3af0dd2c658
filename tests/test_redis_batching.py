"""The client that sends the commands of one event-loop turn as one pipeline
(`core.redis_batching.Batching`, what `core.redis_conn.connect` returns), against a real
redis-server: each caller gets its own reply or its own error, blocking reads stay apart,
a cancelled caller does not strand the others."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from core.redis_batching import Batching, may_batch
from core.redis_conn import TRANSIENT_ERRORS, connect
from core.redis_server import RedisServer


def test_blocking_commands_are_never_batched() -> None:
    assert may_batch(("GET", "k"))
    assert may_batch(("XREADGROUP", "GROUP", "g", "c", "COUNT", 5, "STREAMS", "s", ">"))
    assert not may_batch(("XREADGROUP", "GROUP", "g", "c", "BLOCK", 100, "STREAMS", "s", ">"))
    assert not may_batch((b"XREAD", b"BLOCK", 0, b"STREAMS", b"s", b"$"))
    assert not may_batch(("BLPOP", "k", 1))
    assert not may_batch(())


async def test_connect_gives_a_batching_client(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    try:
        assert isinstance(client, Batching)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_concurrent_callers_share_connections_and_get_their_own_replies(
    redis_server: RedisServer,
) -> None:
    # Two connections at most: sent one by one, 200 concurrent commands would need 200
    # (redis-py refuses with "Too many connections"); batched, they fit.
    client = Batching.from_url(redis_server.url, decode_responses=True, max_connections=2)
    prefix = uuid.uuid4().hex
    try:
        await asyncio.gather(*(client.set(f"{prefix}:{i}", str(i)) for i in range(200)))
        values = await asyncio.gather(*(client.get(f"{prefix}:{i}") for i in range(200)))
        assert values == [str(i) for i in range(200)]
        mixed = await asyncio.gather(
            client.incr(f"{prefix}:n"),
            client.hset(f"{prefix}:h", mapping={"a": "1"}),
            client.hgetall(f"{prefix}:h"),
            client.exists(f"{prefix}:0", f"{prefix}:missing"),
        )
        assert mixed == [1, 1, {"a": "1"}, 1]
    finally:
        await client.aclose()


async def test_an_error_is_only_its_own_callers(redis: Batching) -> None:
    key = f"s:{uuid.uuid4().hex}"
    await redis.set(key, "text")

    async def wrong_type() -> str:
        try:
            await redis.hget(key, "field")
        except ResponseError as exc:
            return f"error: {str(exc).split()[0]}"
        return "no error"

    results = await asyncio.gather(wrong_type(), redis.get(key), wrong_type(), redis.strlen(key))
    assert results == ["error: WRONGTYPE", "text", "error: WRONGTYPE", 4]


async def test_scripts_are_loaded_again_when_the_server_forgot_them(redis: Batching) -> None:
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = f"n:{uuid.uuid4().hex}"
    assert await script(keys=[key], args=[1]) == 1
    await redis.script_flush()  # a restarted Redis: every caller gets NOSCRIPT at once
    results = await asyncio.gather(*(script(keys=[key], args=[1]) for _ in range(10)))
    assert sorted(results) == list(range(2, 12))


async def test_a_blocking_read_does_not_hold_the_others(redis: Batching) -> None:
    stream = f"st:{uuid.uuid4().hex}"
    reading = asyncio.create_task(redis.xread({stream: "$"}, block=30_000))
    await asyncio.sleep(0)  # the read is on its way
    key = f"k:{uuid.uuid4().hex}"
    await asyncio.gather(*(redis.set(f"{key}:{i}", "v") for i in range(20)))
    assert await redis.get(f"{key}:3") == "v"
    assert not reading.done()  # still waiting on the server, alone on its connection
    await redis.xadd(stream, {"f": "v"})  # the sentinel that ends it
    found = await asyncio.wait_for(reading, 10)
    assert found[0][1][0][1] == {"f": "v"}


async def test_a_cancelled_caller_does_not_strand_the_others(redis: Batching) -> None:
    key = f"c:{uuid.uuid4().hex}"
    await redis.set(key, "kept")
    first = asyncio.create_task(redis.get(key))  # gathers this turn's commands
    others = [asyncio.create_task(redis.get(key)) for _ in range(5)]
    await asyncio.sleep(0)  # `first` leads, the others join it
    first.cancel()
    assert await asyncio.wait_for(asyncio.gather(*others), 10) == ["kept"] * 5
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_redis_down_fails_every_caller_with_a_connection_error(
    own_redis: RedisServer,
) -> None:
    client = connect(own_redis.url)
    try:
        assert await client.ping()
        own_redis.stop()
        results = await asyncio.gather(
            *(client.get(f"k{i}") for i in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, TRANSIENT_ERRORS) for r in results), results
        assert any(isinstance(r, RedisConnectionError) for r in results)
        own_redis.start()
        assert await asyncio.gather(*(client.incr("back") for _ in range(3))) == [1, 2, 3]
    finally:
        await client.aclose()


async def test_pipelines_without_a_transaction_join_the_turn(redis_server: RedisServer) -> None:
    client = Batching.from_url(redis_server.url, decode_responses=True, max_connections=2)
    prefix = uuid.uuid4().hex
    try:

        async def piped(i: int) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(f"{prefix}:{i}", str(i))
                pipe.get(f"{prefix}:{i}")
                return await pipe.execute()

        # 100 pipelines and 100 commands at once, over two connections at most.
        results = await asyncio.gather(
            *(piped(i) for i in range(100)), *(client.incr(f"{prefix}:n") for _ in range(100))
        )
        assert results[:100] == [[True, str(i)] for i in range(100)]
        assert sorted(results[100:]) == list(range(1, 101))  # type: ignore[type-var]

        async def wrong_type(raise_on_error: bool) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hget(f"{prefix}:1", "field")  # a string, not a hash
                pipe.get(f"{prefix}:1")
                return await pipe.execute(raise_on_error=raise_on_error)

        kept, raised = await asyncio.gather(
            wrong_type(False), wrong_type(True), return_exceptions=True
        )
        assert isinstance(kept, list)
        assert isinstance(kept[0], ResponseError) and kept[1] == "1"
        assert isinstance(raised, ResponseError)

        # A transaction stays one: MULTI/EXEC on a connection of its own.
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(f"{prefix}:t")
            pipe.incr(f"{prefix}:t")
            assert await pipe.execute() == [1, 2]
    finally:
        await client.aclose()
