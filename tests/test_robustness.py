"""Data cannot kill the worker or an adapter's outbox: corrupt entries are logged and
skipped, failures are retried a bounded number of times, nothing spins. Real redis-server,
real (tiny) transformers model."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.outbox import MAX_POST_ATTEMPTS, OutboxConsumer, PostedParts
from core.conversation import ConversationKey, Reply, Role
from core.generation.transformers_engine import TransformersEngine
from core.jobs import PARKED_CLAIM_MIN_IDLE_MS, WAITING_CONSUMER, Job, JobQueue, Outbox
from core.keys import WORKER_GROUP, Keys
from core.knowledge.store import KnowledgeBaseStore
from core.settings import Settings
from core.worker import Worker
from tests.helpers import RecordingEngine, make_store, outbox, submit

A = ConversationKey("test", "W1", "C1", "thread-a")
B = ConversationKey("test", "W1", "C1", "thread-b")


async def test_a_corrupt_history_entry_is_skipped_not_fatal(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    keys = Keys(settings.namespace)
    await submit(redis, settings, A, "first question", "m1")
    for garbage in ("not json", "[1, 2]", '{"role": "wizard"}', '"text"'):
        await redis.rpush(keys.history(A), garbage)
    await submit(redis, settings, A, "second question", "m2")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    assert await worker.step() == 2
    [reply] = await outbox(redis, settings)
    assert reply.covers_seq == 2 and reply.text.strip()
    history = await make_store(redis, settings).history(A)
    assert [m.role for m in history] == [Role.USER, Role.USER, Role.ASSISTANT]


async def test_a_corrupt_pending_reply_and_counter_do_not_stop_the_worker(
    redis: Any, settings: Settings, tiny_engine: TransformersEngine
) -> None:
    keys = Keys(settings.namespace)
    await submit(redis, settings, A, "hello there", "m1")
    await redis.hset(keys.state(A), mapping={"pending_reply": "{broken", "answered": "x"})
    await submit(redis, settings, B, "another question", "b1")
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    await worker.step()
    replies = await outbox(redis, settings)
    assert {r.conversation for r in replies} == {A, B}


async def test_a_conversation_whose_preparation_fails_does_not_sink_the_batch(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings = make_settings(CHATBOT_MAX_DELIVERIES="1", CHATBOT_RECLAIM_IDLE_S="0.1")
    engine = RecordingEngine(tiny_engine)
    worker = Worker(redis, settings, engine)
    original = worker.policy.decide

    async def decide(conversation: ConversationKey, history: Any, *read: Any) -> Any:
        if conversation == A:
            raise RuntimeError("a bug in the policy")
        return await original(conversation, history, *read)

    worker.policy.decide = decide  # type: ignore[method-assign]
    await submit(redis, settings, A, "this one breaks", "a1")
    await submit(redis, settings, B, "this one works", "b1")
    await worker.queue.ensure_group()
    await worker.step()
    assert [r.conversation for r in await outbox(redis, settings)] == [B]
    await asyncio.sleep(0.2)  # let the failed job become reclaimable (reclaim_idle_s)
    await worker.step()  # claimed again, past max deliveries: dead letter and apology
    replies = await outbox(redis, settings)
    assert [(r.conversation, r.kind) for r in replies] == [(B, "answer"), (A, "apology")]
    assert await redis.xlen(Keys(settings.namespace).dead_letter) == 1


async def test_a_corrupt_passage_is_skipped(redis: Any, keys: Keys) -> None:
    store = KnowledgeBaseStore(redis, keys)
    await redis.hset(keys.kb_passages("default"), mapping={"p1": "{nope", "p2": "[]"})
    _version, passages, vectors, _sentences = await store.load("default")
    assert passages == [] and vectors.shape == (0, 384)


async def test_deferred_jobs_take_no_room_and_the_read_still_waits(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    """A conversation locked by another worker: its jobs are deferred, and the worker
    keeps reading new work (with a blocking read) instead of spinning on them."""
    settings = make_settings(CHATBOT_MAX_BATCH_SIZE="2")
    busy = [ConversationKey("test", "W1", "C1", f"busy-{i}") for i in range(2)]
    store = make_store(redis, settings)
    locks = [store.lock(c, 30) for c in busy]
    for conv, lock in zip(busy, locks, strict=True):
        await submit(redis, settings, conv, "waiting", f"{conv.thread}-m1")
        assert await lock.acquire()
    worker = Worker(redis, settings, tiny_engine)
    await worker.queue.ensure_group()
    reads: list[tuple[int, int | None]] = []
    real_read = worker.queue.read_jobs

    async def read_jobs(count: int, block_ms: int | None) -> Any:
        reads.append((count, block_ms))
        return await real_read(count, block_ms)

    worker.queue.read_jobs = read_jobs  # type: ignore[method-assign]
    await worker.step()  # reads both, both deferred
    assert len(worker.collector.deferred) == 2
    await submit(redis, settings, A, "a new question", "a1")
    before = len(reads)
    await worker.step()
    assert any(block_ms is not None and count >= 1 for count, block_ms in reads[before:])
    assert [r.conversation for r in await outbox(redis, settings)] == [A]
    for lock in locks:
        await lock.release()


async def test_the_heartbeat_never_takes_back_a_job_another_worker_reclaimed(
    redis: Any, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    await submit(redis, settings, A, "hello", "m1")
    first = JobQueue(redis, keys, consumer="first")
    second = JobQueue(redis, keys, consumer="second")
    await first.ensure_group()
    [job] = await first.read_jobs(10, None)
    [taken] = await second.claim_stale_jobs(0, 10)
    assert taken.entry_id == job.entry_id
    await first.touch([job.entry_id])  # the first worker's heartbeat, unaware
    [pending] = await redis.xpending_range(keys.jobs, WORKER_GROUP, min="-", max="+", count=10)
    assert pending["consumer"] == "second"


async def test_a_reply_that_keeps_failing_to_post_ends_in_the_dead_letters(
    redis: Any, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    attempts = 0

    async def post(reply: Reply, parts: PostedParts) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("the platform rejected something unexpected")

    consumer = OutboxConsumer(redis, keys, "test", post, reclaim_idle_s=0, retry_delay_s=0)
    await consumer.ensure_group()
    reply = Reply(f"{A.id}:1", A, "an answer", "m1", 1)
    await Outbox(redis, keys).publish(reply)
    for _ in range(MAX_POST_ATTEMPTS + 2):
        await consumer.step(block_ms=10)
    assert attempts == MAX_POST_ATTEMPTS
    [(_, dead)] = await redis.xrange(keys.dead_letter)
    assert dead["source"] == keys.outbox("test") and "rejected" in dead["reason"]
    groups = await redis.xinfo_groups(keys.outbox("test"))
    assert groups[0]["pending"] == 0


async def test_jobs_waiting_their_turn_are_shared_by_every_worker(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    """A flood read ahead by one worker is parked, not hoarded: a second worker takes
    from it, nothing is answered twice, and no delivery is counted for the parking."""
    settings = make_settings(CHATBOT_MAX_BATCH_SIZE="2", CHATBOT_USER_RATE="1000/min")
    keys = Keys(settings.namespace)
    convs = [ConversationKey("test", "W1", "C1", f"flood-{i}") for i in range(10)]
    for i, conv in enumerate(convs):
        await submit(redis, settings, conv, f"question {i}", f"m{i}", author="flooder")
    first = Worker(redis, settings, RecordingEngine(tiny_engine))
    second = Worker(redis, settings, RecordingEngine(tiny_engine))
    await first.queue.ensure_group()
    await first.step()  # reads all 10, answers 2, parks 8
    parked = await redis.xpending_range(
        keys.jobs, WORKER_GROUP, min="-", max="+", count=20, consumername="waiting-their-turn"
    )
    assert len(parked) == 8 and all(p["times_delivered"] == 1 for p in parked)
    await asyncio.sleep(0.1)  # a parked job may be claimed once idle 50 ms (no double take)
    await second.step()  # the second worker takes its share of them
    assert len(second.engine.requests) == 2  # type: ignore[attr-defined]
    still = await redis.xpending_range(
        keys.jobs, WORKER_GROUP, min="-", max="+", count=20, consumername="waiting-their-turn"
    )
    # the rest stay parked, untouched (their idle time was not reset by a claim and a
    # park back): only what a batch chooses is taken
    assert [p["message_id"] for p in still] == [p["message_id"] for p in parked[2:]]
    assert all(p["time_since_delivered"] >= 100 for p in still)
    while len(await outbox(redis, settings)) < 10:
        await first.step()
    replies = await outbox(redis, settings)
    assert sorted(r.conversation.thread for r in replies) == sorted(c.thread for c in convs)
    assert await redis.xpending(keys.jobs, WORKER_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_parked_jobs_are_seen_alike_by_the_worker_that_parked_them_and_another(
    redis: Any, keys: Keys
) -> None:
    """The worker that parked a job keeps it parsed; another reads it from the stream; a
    malformed parked entry is dead-lettered (once) and the good job is still seen."""
    parker, other = JobQueue(redis, keys, "parker"), JobQueue(redis, keys, "other")
    await parker.ensure_group()
    good = await parker.enqueue(A, 1, "m1", "ann")
    bad = str(await redis.xadd(keys.jobs, {"conversation": "not an id"}))
    read = await parker.read_new(10, None)
    assert [e for e, _ in read] == [good, bad]
    [job] = [Job.from_entry(e, f) for e, f in read if e == good]
    await parker.park([job])
    await redis.xclaim(keys.jobs, WORKER_GROUP, WAITING_CONSUMER, 0, [bad], justid=True)
    reads = await xrange_calls(redis)
    assert [j.entry_id for j in await parker.peek_parked(10)] == [good]
    # The parker read back only the entry it did not park itself (the malformed one).
    assert await xrange_calls(redis) == reads + 1
    await asyncio.sleep(PARKED_CLAIM_MIN_IDLE_MS / 1000 * 2)  # idle enough to be claimed
    seen = await other.peek_parked(10)
    assert [(j.entry_id, j.conversation, j.seq, j.author) for j in seen] == [(good, A, 1, "ann")]
    dead = await redis.xrange(keys.dead_letter)
    assert [fields["entry_id"] for _, fields in dead] == [bad]
    assert [j.entry_id for j in await parker.peek_parked(10)] == [good]
    assert len(await redis.xrange(keys.dead_letter)) == 1


async def xrange_calls(redis: Any) -> int:
    """XRANGE commands the server has run (every test's, so compare differences)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))
