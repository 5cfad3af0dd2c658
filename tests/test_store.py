import asyncio
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.conversation import ConversationKey, Message, Reply, Role
from core.keys import POSTED_TTL_S, Keys
from core.settings import Settings
from tests.helpers import make_store

CONV = ConversationKey("slack", "T1", "C1", "1700000000.000100")


def message(message_id: str, text: str = "hello", role: Role = Role.USER) -> Message:
    return Message(role, text, "U1", "Ann", message_id, 1_700_000_000.5)


def test_conversation_id_round_trips_and_escapes_separators() -> None:
    odd = ConversationKey("discord", "g:1", "c{2}", "")
    assert ConversationKey.from_id(odd.id) == odd
    assert ":" not in odd.id.split(":")[1]
    assert "{" not in odd.id


async def test_messages_are_numbered_and_deduplicated(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    first = await store.add_message(CONV, message("m1"))
    second = await store.add_message(CONV, message("m2", "again"))
    again = await store.add_message(CONV, message("m1"))
    assert (first.seq, first.is_new) == (1, True)
    assert (second.seq, second.is_new) == (2, True)
    assert (again.seq, again.is_new, again.settled) == (1, False, False)
    await store.mark_settled(CONV, "m1")
    assert (await store.add_message(CONV, message("m1"))).settled
    history = await store.history(CONV)
    assert [(m.message_id, m.seq, m.text) for m in history] == [
        ("m1", 1, "hello"),
        ("m2", 2, "again"),
    ]
    assert history[0].author_name == "Ann" and history[0].timestamp == 1_700_000_000.5


async def test_a_separate_dedupe_id_is_honoured(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    assert (await store.add_message(CONV, message("m1"), dedupe_id="Ev1")).is_new
    assert not (await store.add_message(CONV, message("m1-copy"), dedupe_id="Ev1")).is_new


async def test_history_is_bounded_and_expires(redis: Any, make_settings: Any) -> None:
    settings = make_settings(CHATBOT_HISTORY_MAX_MESSAGES="3", CHATBOT_HISTORY_TTL_S="120")
    store = make_store(redis, settings)
    for i in range(5):
        await store.add_message(CONV, message(f"m{i}", f"text {i}"))
    history = await store.history(CONV)
    assert [m.text for m in history] == ["text 2", "text 3", "text 4"]
    keys = Keys(settings.namespace)
    assert 0 < await redis.ttl(keys.history(CONV)) <= 120
    # The state (message numbering, no text once replies are delivered) lives as long as
    # the outbox's records of posted replies, so that reply names never repeat.
    assert 120 < await redis.ttl(keys.state(CONV)) <= POSTED_TTL_S
    assert 0 < await redis.ttl(keys.seen(CONV, "m4")) <= 24 * 3600


async def test_unicode_survives_the_lua_round_trip(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    text = 'Grüße 👋 "quoted" \\ back/slash\nnew line'
    await store.add_message(CONV, message("m1", text))
    assert (await store.history(CONV))[0].text == text


async def test_a_reply_commits_once_and_waits_until_delivered(
    redis: Any, settings: Settings
) -> None:
    store = make_store(redis, settings)
    await store.add_message(CONV, message("m1"))
    reply = Reply("r1", CONV, "Hi Ann", "m1", covers_seq=1)
    answer = message("r1", "Hi Ann", Role.ASSISTANT)
    assert await store.commit_reply(reply, answer)
    assert not await store.commit_reply(reply, answer)  # a redelivered job: no second reply
    state = await store.state(CONV)
    assert (state.seq, state.answered, state.pending_reply) == (2, 1, reply)
    await store.clear_pending(reply)
    assert (await store.state(CONV)).pending_reply is None
    assert [m.role for m in await store.history(CONV)] == [Role.USER, Role.ASSISTANT]


async def test_locks_belong_to_their_holder(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    a, b = store.lock(CONV, 5), store.lock(CONV, 5)
    assert await a.acquire()
    assert not await b.acquire()
    assert not await b.renew()
    await b.release()  # not b's: stays
    assert not await b.acquire()
    assert await a.renew()
    assert store.held_locks == {a}
    await a.release()
    assert store.held_locks == set()
    assert await b.acquire()
    await b.release()


async def test_a_lock_block_releases_on_error(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    with pytest.raises(RuntimeError):
        async with store.lock(CONV, 5) as lock:
            assert lock.held
            async with store.lock(CONV, 5) as other:
                assert not other.held  # a busy lock is not waited for
            raise RuntimeError("boom")
    assert await redis.get(store.keys.lock(CONV)) is None
    assert store.held_locks == set()


async def test_reset_keeps_the_numbering_so_reply_ids_never_repeat(
    redis: Any, settings: Settings
) -> None:
    store = make_store(redis, settings)
    first = await store.add_message(CONV, message("m1"))
    await store.reset(CONV)
    assert await store.history(CONV) == []
    second = await store.add_message(CONV, message("m2"))
    assert second.seq > first.seq  # a reply to it gets a name never used before
    # The numbering outlives the outbox's record of posted replies, even when the
    # history expires sooner.
    assert await redis.ttl(store.keys.state(CONV)) > POSTED_TTL_S - 60


_NAMES = st.text(max_size=40)
_TEXTS = st.text(min_size=1, max_size=300).filter(lambda t: t.strip() != "")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(_TEXTS, min_size=1, max_size=4), name=_NAMES)
def test_any_text_survives_the_store_scripts(
    redis_server: Any, texts: list[str], name: str
) -> None:
    """Messages go through Lua's cjson on the way in (and on commit and forget): whatever
    a user types comes back as it was, in order, numbered."""

    async def round_trip() -> None:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        store = make_store(
            client, Settings.from_mapping({"CHATBOT_NAMESPACE": f"p{uuid4().hex[:8]}"})
        )
        try:
            conv = ConversationKey("slack", "T1", "C1", uuid4().hex)
            for i, text in enumerate(texts):
                msg = Message(Role.USER, text, "u1", name, f"m{i}", 0.0)
                await store.add_message(conv, msg)
            reply = Reply(f"{conv.id}:{len(texts)}", conv, texts[-1], "m0", len(texts))
            assert await store.commit_reply(
                reply, Message(Role.ASSISTANT, texts[-1], "a", "A", "r", 0.0)
            )
            history = await store.history(conv)
            assert [m.text for m in history] == [*texts, texts[-1]]
            assert [m.seq for m in history] == list(range(1, len(texts) + 2))
            assert {m.author_name for m in history if m.role is Role.USER} <= {name}
            assert (await store.state(conv)).pending_reply == reply
        finally:
            await client.aclose()

    asyncio.run(round_trip())
