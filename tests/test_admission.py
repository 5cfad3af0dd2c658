"""Streams never drop unread work; a full queue and a flooding user are answered politely
and nothing of theirs is queued. Real redis-server."""

from __future__ import annotations

from typing import Any

from core.admission import BUSY_TEXT, RATE_LIMITED_TEXT
from core.conversation import ConversationKey
from core.inbound import Outcome
from core.jobs import JobQueue, trim_acknowledged
from core.keys import Keys
from core.settings import Settings
from core.support.feedback import read_stats
from tests.helpers import make_store, submit

A = ConversationKey("test", "W1", "C1", "a")
B = ConversationKey("test", "W1", "C1", "b")


async def test_trimming_keeps_every_job_not_yet_acknowledged(
    redis: Any, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    queue = JobQueue(redis, keys, consumer="w1")
    await queue.ensure_group()
    for i in range(6):
        await queue.enqueue(ConversationKey("test", "W1", "C1", f"t{i}"), 1, f"m{i}")
    read = await queue.read_jobs(4, None)  # 4 read, 2 never read
    await queue.ack([j.entry_id for j in read[:2]])  # 2 done, 2 still in progress
    assert await trim_acknowledged(redis, keys.jobs) == 2
    left = [fields["message_id"] for _, fields in await redis.xrange(keys.jobs)]
    assert left == ["m2", "m3", "m4", "m5"]
    await queue.ack([j.entry_id for j in read[2:]])
    await trim_acknowledged(redis, keys.jobs)
    assert [f["message_id"] for _, f in await redis.xrange(keys.jobs)] == ["m4", "m5"]


async def test_a_stream_no_one_reads_yet_is_never_trimmed(redis: Any, settings: Settings) -> None:
    keys = Keys(settings.namespace)
    await redis.xadd(keys.outbox("nobody"), {"x": "1"})
    assert await trim_acknowledged(redis, keys.outbox("nobody")) == 0
    assert await redis.xlen(keys.outbox("nobody")) == 1


async def test_a_full_queue_answers_busy_and_stores_nothing(redis: Any, make_settings: Any) -> None:
    settings = make_settings(CHATBOT_MAX_QUEUED_JOBS="2")
    for i in range(2):
        conv = ConversationKey("test", "W1", "C1", f"t{i}")
        assert (await submit(redis, settings, conv, "hello", f"m{i}", author=f"u{i}")).outcome is (
            Outcome.QUEUED
        )
    refused = await submit(redis, settings, A, "one more", "m9", author="u9")
    assert (refused.outcome, refused.reply_text) == (Outcome.BUSY, BUSY_TEXT)
    assert await make_store(redis, settings).history(A) == []


async def test_a_flooding_user_is_told_once_and_others_still_get_in(
    redis: Any, make_settings: Any
) -> None:
    settings = make_settings(CHATBOT_USER_RATE="3/min")
    outcomes = [
        await submit(redis, settings, A, f"message {i}", f"a{i}", author="flooder")
        for i in range(6)
    ]
    assert [o.outcome for o in outcomes] == [Outcome.QUEUED] * 3 + [Outcome.RATE_LIMITED] * 3
    assert [o.reply_text for o in outcomes[3:]] == [RATE_LIMITED_TEXT, "", ""]  # told once
    assert len(await make_store(redis, settings).history(A)) == 3
    other = await submit(redis, settings, B, "my question", "b1", author="someone-else")
    assert other.outcome is Outcome.QUEUED
    stats = await read_stats(redis, Keys(settings.namespace), "test")
    assert stats.counts["rate_limited"] == 3


async def test_a_platform_retry_neither_counts_against_the_rate_nor_meets_a_full_queue(
    redis: Any, make_settings: Any
) -> None:
    settings = make_settings(CHATBOT_USER_RATE="2/min", CHATBOT_MAX_QUEUED_JOBS="2")
    first = await submit(redis, settings, A, "my question", "a1", author="u1")
    retried = await submit(redis, settings, A, "my question", "a1", author="u1")
    assert (first.outcome, retried.outcome) == (Outcome.QUEUED, Outcome.DUPLICATE)
    second = await submit(redis, settings, A, "and another", "a2", author="u1")
    assert second.outcome is Outcome.QUEUED  # the retry did not use the second place
    # The queue is now full (2 jobs): a retry of a message already in it is still no refusal.
    again = await submit(redis, settings, A, "and another", "a2", author="u1")
    assert again.outcome is Outcome.DUPLICATE
    third = await submit(redis, settings, A, "a third one", "a3", author="u1")
    assert third.outcome is Outcome.BUSY
    assert len(await make_store(redis, settings).history(A)) == 2


async def test_listed_mode_serves_only_the_workspaces_an_operator_set_up(
    redis: Any, make_settings: Any
) -> None:
    from core.support.workspaces import Workspaces

    settings = make_settings(CHATBOT_WORKSPACES="listed")
    stranger = ConversationKey("test", "W-STRANGER", "C1", "t")
    ours = ConversationKey("test", "W-OURS", "C1", "t")
    await Workspaces(redis, Keys(settings.namespace), settings).set(
        "test", "W-OURS", {"kb": "default"}
    )
    assert (await submit(redis, settings, stranger, "hi", "s1")).outcome is Outcome.NOT_ALLOWED
    assert (await submit(redis, settings, ours, "hi", "o1")).outcome is Outcome.QUEUED
    assert await make_store(redis, settings).history(stranger) == []


def test_a_batch_is_filled_user_by_user() -> None:
    from core.jobs import Job, fair_share

    flood = [
        Job(f"1-{i}", ConversationKey("test", "W1", "C1", f"a{i}"), 1, f"a{i}", author="ann")
        for i in range(10)
    ]
    burst = [
        Job(f"1-{20 + i}", ConversationKey("test", "W1", "C1", "b"), i + 1, f"b{i}", author="bob")
        for i in range(2)
    ]
    late = Job("1-30", ConversationKey("test", "W1", "C1", "c"), 1, "c", author="cid")
    batch, rest = fair_share([*flood, *burst, late], 4)
    assert [j.author for j in batch] == ["ann", "bob", "bob", "cid"]  # bob's burst together
    assert len(rest) == 9 and all(j.author == "ann" for j in rest)
