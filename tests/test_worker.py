"""The worker against a real redis-server and a real (tiny, random-weight) transformers model."""

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from core.conversation import ConversationKey, Role
from core.errors import POLITE_FAILURE
from core.generation.transformers_engine import TransformersEngine
from core.inbound import Outcome
from core.jobs import JobQueue
from core.keys import WORKER_GROUP, Keys
from core.redis_server import RedisServer
from core.settings import Settings
from core.worker import Worker
from tests.helpers import RecordingEngine, make_store, outbox, submit, wait_for

A = ConversationKey("test", "W1", "C1", "thread-a")
B = ConversationKey("test", "W1", "C1", "thread-b")


async def pending_count(redis: Any, settings: Settings) -> int:
    info = await redis.xpending(Keys(settings.namespace).jobs, WORKER_GROUP)
    return int(info["pending"])


async def test_a_message_gets_one_reply_in_outbox_and_history(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    assert (await submit(redis, settings, A, "Where is my parcel?", "m1")).outcome is Outcome.QUEUED
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    assert await worker.step() == 1
    [reply] = await outbox(redis, settings)
    assert reply.conversation == A and reply.reply_to == "m1" and reply.covers_seq == 1
    assert reply.text.strip()
    history = await make_store(redis, settings).history(A)
    assert [(m.role, m.seq) for m in history] == [(Role.USER, 1), (Role.ASSISTANT, 2)]
    assert history[1].text == reply.text
    assert await pending_count(redis, settings) == 0


async def test_a_burst_is_answered_once_with_every_message_in_context(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    for i, text in enumerate(["hi", "my order 123 is late", "it was due monday"], start=1):
        await submit(redis, settings, A, text, f"m{i}")
    engine = RecordingEngine(tiny_engine)
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    await worker.step()
    [reply] = await outbox(redis, settings)
    assert reply.covers_seq == 3 and reply.reply_to == "m3"
    [request] = engine.requests
    assert request.turns[-1] == {
        "role": "user",
        "content": "hi\nmy order 123 is late\nit was due monday",
    }
    assert await pending_count(redis, settings) == 0


async def test_messages_of_one_conversation_are_answered_in_order(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    engine = RecordingEngine(tiny_engine)
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    task = asyncio.create_task(worker.run())
    try:
        for i in range(1, 4):
            await submit(redis, settings, A, f"question {i}", f"m{i}")

            async def answered(n: int = i) -> bool:
                return len(await outbox(redis, settings)) == n

            await wait_for(answered, what=f"reply {i}")
    finally:
        worker.stop()
        await task
    replies = await outbox(redis, settings)
    assert [r.reply_to for r in replies] == ["m1", "m2", "m3"]
    history = await make_store(redis, settings).history(A)
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT] * 3
    # Each prompt ends with the question it answers and holds the earlier exchange.
    assert [r.turns[-1]["content"] for r in engine.requests] == [f"question {i}" for i in (1, 2, 3)]
    assert len(engine.requests[2].turns) == 1 + 5


async def test_conversations_are_isolated_and_generated_in_one_batch(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    await submit(redis, settings, A, "alpha question", "a1", author="ann")
    await submit(redis, settings, B, "beta question", "b1", author="bob")
    engine = RecordingEngine(tiny_engine)
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    tiny_engine.batcher.peak_batch_size = 0
    await worker.step()
    assert len(engine.requests) == 2
    assert tiny_engine.batcher.peak_batch_size == 2  # decoded together
    prompts = {r.request_id.split(":")[3]: str(r.turns) for r in engine.requests}
    assert "alpha" in prompts["thread-a"] and "beta" not in prompts["thread-a"]
    assert "beta" in prompts["thread-b"] and "alpha" not in prompts["thread-b"]
    replies = await outbox(redis, settings)
    assert {r.conversation for r in replies} == {A, B}
    store = make_store(redis, settings)
    assert {m.author_id for m in await store.history(A)} == {"ann", "assistant"}


async def test_redis_lost_midway_through_a_batch_leaves_no_conversation_locked(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    """Redis fails while the worker prepares the second conversation of a batch (a failover,
    a dropped connection): the first, already locked, is still answered and its lock
    released; the second is taken again next step. Before, the first one's lock was
    dropped unreleased and renewed by the heartbeat for ever: never answered again."""
    await submit(redis, settings, A, "alpha question", "a1")
    await submit(redis, settings, B, "beta question", "b1")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    history = worker.store.history
    failed: list[ConversationKey] = []

    async def history_once_unreachable(conversation: ConversationKey) -> Any:
        if conversation == B and not failed:
            failed.append(conversation)
            raise RedisConnectionError("Connection closed by server.")
        return await history(conversation)

    worker.store.history = history_once_unreachable  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        await worker.step()
    assert failed == [B]

    async def a_answered() -> bool:
        return [r.conversation for r in await outbox(redis, settings)] == [A]

    await wait_for(a_answered, what="the reply to the conversation prepared before the error")
    await worker.drain()
    keys = Keys(settings.namespace)
    assert not worker.store.held_locks
    assert await redis.exists(keys.lock(A), keys.lock(B)) == 0
    assert await worker.step() == 1  # B's job, deferred, comes back at once
    assert {r.conversation for r in await outbox(redis, settings)} == {A, B}
    assert await pending_count(redis, settings) == 0


async def test_the_lock_and_what_its_holder_reads_go_in_one_round_trip(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    """Taking a conversation costs one round trip: SET NX first, the reads behind it in the
    same pipeline (executed after it, so they read what the holder may rely on). While
    another worker holds the lock, the reads are dropped and the job waits its turn."""
    keys = Keys(settings.namespace)
    await submit(redis, settings, A, "hello", "m1")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    sent: list[list[str]] = []
    send = redis._send

    async def recording(batch: Any) -> None:
        names = [str(p.args[0]).upper() for p in batch]
        if any(keys.lock(A) in map(str, p.args) for p in batch):
            sent.append(names)
        await send(batch)

    redis._send = recording
    await redis.set(keys.lock(A), "another worker", px=60_000)
    assert await worker.step() == 1
    await worker.drain()
    assert await outbox(redis, settings) == []  # another worker has it: not answered here
    assert sent and sent[0][0] == "SET"
    assert {"HGETALL", "LRANGE"} <= set(sent[0][1:])  # read in the same round trip
    await redis.delete(keys.lock(A))
    assert await worker.step() == 1  # the deferred job, taken now
    await worker.drain()
    assert [r.conversation for r in await outbox(redis, settings)] == [A]
    assert await redis.exists(keys.lock(A)) == 0


async def test_a_redelivered_job_does_not_post_a_second_reply(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    await submit(redis, settings, A, "hello", "m1")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    await worker.step()
    await JobQueue(redis, Keys(settings.namespace)).enqueue(A, 1, "m1")  # the same job again
    await worker.step()
    assert len(await outbox(redis, settings)) == 1
    assert await pending_count(redis, settings) == 0


async def test_a_job_left_by_a_dead_worker_is_taken_over(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings = make_settings(CHATBOT_RECLAIM_IDLE_S="0.2")
    keys = Keys(settings.namespace)
    await submit(redis, settings, A, "hello", "m1")
    dead = JobQueue(redis, keys, consumer="dead-worker")
    await dead.ensure_group()
    assert len(await dead.read_new(10, None)) == 1  # taken, never acknowledged
    await asyncio.sleep(0.3)
    worker = Worker(redis, settings, tiny_engine)
    assert await worker.step() == 1
    assert len(await outbox(redis, settings)) == 1
    assert await pending_count(redis, settings) == 0


async def test_two_workers_never_answer_twice(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings = make_settings(CHATBOT_RECLAIM_IDLE_S="0.5", CHATBOT_MAX_BATCH_SIZE="2")
    workers = [Worker(redis, settings, tiny_engine) for _ in range(2)]
    await workers[0].queue.ensure_group()
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        convs = [ConversationKey("test", "W", "C", f"t{i}") for i in range(4)]
        for round_ in range(3):
            for conv in convs:
                await submit(redis, settings, conv, f"round {round_}", f"{conv.thread}-{round_}")

        store = make_store(redis, settings)

        async def settled() -> bool:
            for conv in convs:
                newest = max(m.seq for m in await store.history(conv) if m.role is Role.USER)
                if (await store.state(conv)).answered < newest:
                    return False
            return not await pending_count(redis, settings)

        await wait_for(settled, what="every conversation answered")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
    replies = await outbox(redis, settings)
    assert len({r.reply_id for r in replies}) == len(replies)  # no reply posted twice
    for conv in convs:
        mine = [r.covers_seq for r in replies if r.conversation == conv]
        assert mine == sorted(mine) and len(mine) >= 1
        history = await store.history(conv)
        assert history[-1].role is Role.ASSISTANT
        assert len([m for m in history if m.role is Role.ASSISTANT]) == len(mine)


async def test_a_poison_job_is_dead_lettered_and_the_user_gets_an_apology(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings = make_settings(CHATBOT_RECLAIM_IDLE_S="0.1", CHATBOT_MAX_DELIVERIES="2")
    engine = RecordingEngine(tiny_engine, fail_marker="POISON")
    await submit(redis, settings, A, "POISON please", "m1")
    await submit(redis, settings, B, "a normal question", "b1")
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    keys = Keys(settings.namespace)

    async def dead_lettered() -> bool:
        await worker.step()
        return await redis.xlen(keys.dead_letter) == 1

    await wait_for(dead_lettered, what="the poison job in the dead-letter stream")
    replies = await outbox(redis, settings)
    assert [(r.conversation, r.kind) for r in replies].count((A, "apology")) == 1
    assert [r.text for r in replies if r.conversation == A] == [POLITE_FAILURE]
    assert [r.kind for r in replies if r.conversation == B] == ["answer"]
    [(_, dead)] = await redis.xrange(keys.dead_letter)
    assert "poisoned request" in dead["reason"] and '"seq": "1"' in dead["fields"]
    assert await pending_count(redis, settings) == 0


async def test_a_malformed_job_is_dead_lettered(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    keys = Keys(settings.namespace)
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    await redis.xadd(keys.jobs, {"garbage": "yes"})
    await redis.xadd(keys.jobs, {"conversation": "not-an-id", "seq": "x", "message_id": "m"})
    await worker.step()
    assert await redis.xlen(keys.dead_letter) == 2
    assert await pending_count(redis, settings) == 0


async def test_empty_and_duplicate_messages_are_not_queued(redis: Any, settings: Settings) -> None:
    keys = Keys(settings.namespace)
    empty = await submit(redis, settings, A, " \x00\n ", "m0")
    assert empty.outcome is Outcome.REJECTED and "empty" in empty.reply_text
    assert (await submit(redis, settings, A, "hi", "m1")).outcome is Outcome.QUEUED
    assert (await submit(redis, settings, A, "hi", "m1")).outcome is Outcome.DUPLICATE
    assert await redis.xlen(keys.jobs) == 1


async def test_a_100kb_message_is_stored_shortened_and_answered(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    result = await submit(redis, settings, A, "x" * 100_000, "m1")
    assert result.outcome is Outcome.QUEUED and result.truncated
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    await worker.step()
    assert len(await outbox(redis, settings)) == 1
    [stored, _] = await make_store(redis, settings).history(A)
    assert len(stored.text) < 5000


async def test_history_and_jobs_survive_a_redis_outage_and_restart(
    tmp_path: Path, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    settings = make_settings(REDIS_URL=server.url)
    redis = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        worker = Worker(redis, settings, tiny_engine)
        await worker.queue.ensure_group()
        await submit(redis, settings, A, "first question", "m1")
        await worker.step()
        await submit(redis, settings, A, "second question", "m2")
        server.stop()  # Redis goes away with a job waiting; AOF keeps it

        task = asyncio.create_task(worker.run())
        await asyncio.sleep(1.0)  # the worker meets a dead Redis and keeps retrying
        assert not task.done()
        server.start()  # same port, same data directory

        async def answered() -> bool:
            return len(await outbox(redis, settings)) == 2

        await wait_for(answered, what="the reply after Redis came back")
        worker.stop()
        await task
        history = await make_store(redis, settings).history(A)
        assert [m.text for m in history if m.role is Role.USER] == [
            "first question",
            "second question",
        ]
        assert [m.role for m in history] == [Role.USER, Role.ASSISTANT] * 2

        # A new worker process (a restart) sees the whole history in its prompt.
        engine = RecordingEngine(tiny_engine)
        fresh = Worker(redis, settings, engine)
        await submit(redis, settings, A, "third question", "m3")
        await fresh.step()
        assert "first question" in str(engine.requests[0].turns)
    finally:
        await redis.aclose()
        server.stop()
