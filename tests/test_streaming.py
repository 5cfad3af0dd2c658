"""Continuous batching in the engine, and replies streamed through Redis by the worker
(real redis-server, the real engine on a tiny random-weight model)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from core.conversation import ConversationKey
from core.generation.engine import GenerationRequest
from core.generation.transformers_engine import TransformersEngine
from core.keys import Keys
from core.knowledge.answers import chat_so_far, compose_chat
from core.settings import Settings
from core.streaming import STREAM_KIND
from core.worker import Worker
from tests.helpers import ScriptedEngine, outbox, outbox_entries, submit, wait_for

A = ConversationKey("test", "W1", "C1", "stream-a")
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def request(request_id: str, max_new_tokens: int, text: str = "hello there") -> GenerationRequest:
    turns = [TURNS[0], {"role": "user", "content": text}]
    return GenerationRequest(request_id, turns, max_new_tokens)


def own_engine(tiny_engine: TransformersEngine, max_batch_size: int) -> TransformersEngine:
    """The tiny model behind an engine (and batcher) of the test's own."""
    return TransformersEngine(
        tiny_engine.model,
        tiny_engine.tokenizer,
        context_tokens=tiny_engine.context_tokens,
        max_batch_size=max_batch_size,
    )


async def test_a_short_request_arriving_during_a_long_one_finishes_first(
    tiny_engine: TransformersEngine,
) -> None:
    engine = own_engine(tiny_engine, 4)
    started = asyncio.Event()
    order: list[str] = []

    async def run(item: GenerationRequest) -> Any:
        generation = await engine.stream(item, lambda _text: started.set())
        order.append(item.request_id)
        return generation

    long_task = asyncio.create_task(run(request("long", 300, "tell me everything")))
    await asyncio.wait_for(started.wait(), 30)  # the long one is decoding
    short = await run(request("short", 4))
    assert order == ["short"] and not long_task.done()
    assert short.finish_reason == "length" and short.new_tokens == 4
    long = await long_task
    assert order == ["short", "long"] and long.new_tokens > 4
    assert engine.batcher.peak_batch_size == 2  # they decoded side by side


async def test_cancelling_a_request_frees_its_place(tiny_engine: TransformersEngine) -> None:
    engine = own_engine(tiny_engine, 1)  # one place: the next request needs the freed one
    grew = asyncio.Event()
    long_task = asyncio.create_task(
        engine.stream(request("long", 400, "a long one"), lambda _text: grew.set())
    )
    await asyncio.wait_for(grew.wait(), 30)
    steps_before = engine.batcher.decode_steps
    long_task.cancel()
    next_one = await asyncio.wait_for(engine.stream(request("next", 5), lambda _t: None), 60)
    assert next_one.finish_reason == "length" and next_one.new_tokens == 5
    # The cancelled request left at once: far fewer steps than its 400 tokens would take.
    assert engine.batcher.decode_steps - steps_before < 100


async def test_one_request_alone_decodes_as_generate_does(tiny_engine: TransformersEngine) -> None:
    for i, text in enumerate(["hi", "where is my parcel, it is late", "refund please"]):
        item = request(f"r{i}", 24, text)
        [padded] = tiny_engine.generate_sync([item])
        streamed = await tiny_engine.stream(item, lambda _t: None)
        assert (streamed.text, streamed.new_tokens) == (padded.text, padded.new_tokens)


async def test_a_streamed_reply_grows_in_redis_then_is_committed_once(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings: Settings = make_settings(CHATBOT_STREAMING="on")
    words = "Thanks for asking. Your parcel left our warehouse and is on its way to you now."
    engine = ScriptedEngine(tiny_engine, lambda _r: words)
    engine.word_delay_s = 0.05
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    await submit(redis, settings, A, "where is my parcel?", "m1")
    await worker.step()
    entries = await outbox_entries(redis, settings)
    assert [e.kind for e in entries] == [STREAM_KIND, "answer"]
    opening, [final] = entries[0], await outbox(redis, settings)
    assert opening.reply_id == final.reply_id and opening.meta == {"user": "u1"}
    assert final.text.startswith(words)
    stream = await redis.xrange(Keys(settings.namespace).reply_stream(A, final.reply_id))
    texts = [fields["text"] for _, fields in stream if "text" in fields]
    assert "done" in stream[-1][1]
    assert len(texts) >= 2 and texts[-1] != texts[0]  # it grew, several times
    for shorter, longer in itertools.pairwise(texts):
        assert longer.startswith(shorter)  # only ever grows
    assert all(final.text.startswith(text) for text in texts)  # nothing shown is taken back


async def test_with_streaming_off_only_the_complete_reply_is_published(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings: Settings = make_settings(CHATBOT_STREAMING="off")
    engine = ScriptedEngine(tiny_engine, lambda _r: "One two three four five six.")
    worker = Worker(redis, settings, engine)
    await worker.queue.ensure_group()
    await submit(redis, settings, A, "hi", "m1")
    await worker.step()
    assert [e.kind for e in await outbox_entries(redis, settings)] == ["answer"]
    assert not await redis.exists(Keys(settings.namespace).reply_stream(A, f"{A.id}:1"))


async def test_the_real_engine_streams_through_the_worker(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings: Settings = make_settings(CHATBOT_STREAMING="on", CHATBOT_MAX_NEW_TOKENS="40")
    worker = Worker(redis, settings, tiny_engine)
    task = asyncio.create_task(worker.run())
    try:
        await submit(redis, settings, A, "hello", "m1")

        async def answered() -> bool:
            return len(await outbox(redis, settings)) == 1

        await wait_for(answered, 60, "the reply")
    finally:
        worker.stop()
        await task
    [final] = await outbox(redis, settings)
    stream = await redis.xrange(Keys(settings.namespace).reply_stream(A, final.reply_id))
    texts = [fields["text"] for _, fields in stream if "text" in fields]
    assert texts, "nothing streamed"
    assert all(final.text.startswith(text) for text in texts)


def test_with_a_knowledge_base_only_fact_free_whole_sentences_show() -> None:
    generated = "Happy to help with that. Our fee is 25 dollars. Anything else?"
    shown = [chat_so_far(generated[:n], knowledge=True) for n in range(len(generated) + 1)]
    final = compose_chat(generated, knowledge=True)
    assert final == "Happy to help with that."  # the model may not state the fee
    assert set(shown) == {"", "Happy to help with that."}
    assert all(final.startswith(text) for text in shown)
    # Without one, words show as they come, never a half-written word.
    assert chat_so_far("Hello there, frie", knowledge=False) == "Hello there,"
    assert compose_chat("Our fee is 25 dollars.", knowledge=True) != "Our fee is 25 dollars."


async def test_a_handoff_stops_the_reply_being_generated(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine, keys: Keys
) -> None:
    from core.support.handoff import Handoffs

    settings: Settings = make_settings(CHATBOT_STREAMING="on")
    words = " ".join(f"word{i}" for i in range(60)) + "."
    engine = ScriptedEngine(tiny_engine, lambda _r: words)
    engine.word_delay_s = 0.2  # 12 s for the whole reply
    worker = Worker(redis, settings, engine)
    task = asyncio.create_task(worker.run())
    try:
        await submit(redis, settings, A, "tell me a lot", "m1")
        stream = keys.reply_stream(A, f"{A.id}:1")

        async def streaming() -> bool:
            return bool(await redis.exists(stream))

        await wait_for(streaming, 30, "the reply to start streaming")
        await Handoffs(redis, keys, 3600).start(A, "u1", "U1", "asked for a person")

        async def committed() -> bool:
            return len(await outbox(redis, settings)) == 1

        await wait_for(committed, 8, "the reply to stop")  # long before its 12 s
    finally:
        worker.stop()
        await task
    [reply] = await outbox(redis, settings)
    assert words.startswith(reply.text) and len(reply.text) < len(words) / 2
