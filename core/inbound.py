"""What every adapter does with an incoming user message: clean, dedupe, persist, enqueue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar

from core import metrics
from core.admission import BUSY_TEXT, RATE_LIMITED_TEXT, RateLimiter
from core.context import handling
from core.conversation import ConversationKey, Message, Role
from core.jobs import JobQueue
from core.redis_batching import together
from core.redis_conn import with_retry
from core.store import ConversationStore
from core.support.handoff import Handoff, Handoffs
from core.support.privacy import UserData
from core.support.workspaces import WorkspaceConfig, Workspaces
from core.text import EMPTY_MESSAGE_REPLY, clean_name, clean_user_text

log = logging.getLogger(__name__)

T = TypeVar("T")


class Outcome(StrEnum):
    QUEUED = "queued"  # stored and waiting for the worker
    DUPLICATE = "duplicate"  # seen before (platform retry, second replica): nothing to do
    REJECTED = "rejected"  # nothing usable in it: answer `reply_text` directly
    HANDED_OFF = "handed_off"  # stored; a person has the conversation, the bot stays quiet
    NOT_ALLOWED = "not_allowed"  # a channel this workspace does not let the bot answer in
    RATE_LIMITED = "rate_limited"  # past CHATBOT_USER_RATE: `reply_text` says so (or "")
    BUSY = "busy"  # the job queue is full: answer `reply_text` directly, nothing stored


@dataclass(frozen=True)
class Retry:
    """How long inbound Redis calls are retried: until `stop` or `give_up_at`."""

    stop: asyncio.Event | None
    give_up_at: float | None

    async def __call__(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await with_retry(what, call, stop=self.stop, give_up_at=self.give_up_at)


@dataclass(frozen=True)
class Submission:
    outcome: Outcome
    seq: int = 0
    reply_text: str = ""  # when set, the adapter posts it at once, as the bot's answer
    truncated: bool = False


async def submit_user_message(
    store: ConversationStore,
    queue: JobQueue,
    conversation: ConversationKey,
    *,
    text: str | bytes,
    author_id: str,
    author_name: str,
    message_id: str,
    max_chars: int,
    dedupe_id: str | None = None,
    timestamp: float | None = None,
    stop: asyncio.Event | None = None,
    give_up_after_s: float | None = None,
    direct: bool = False,
    is_agent: Callable[[], Awaitable[bool]] | None = None,
    received_at: float | None = None,
) -> Submission:
    """Persist the message in its conversation and enqueue a job for it, exactly once.

    Safe to call again with the same `dedupe_id` (or `message_id`) after any failure: a
    message stored but not yet enqueued is enqueued by the retry. `direct` marks a direct
    message, which workspace channel restrictions do not apply to. While a person has the
    conversation, the message is stored and not enqueued; it has the `human_agent` role
    only when `is_agent` (the adapter's look-up of the support team, asked only then)
    says its author is one.
    Redis calls are retried until `stop` is set or `give_up_after_s` has passed (then the
    Redis error is raised: the platform must deliver the message again). `received_at`:
    when the adapter received it (epoch seconds; default now), for the reply's timings.
    """
    received_at = time.time() if received_at is None else received_at
    with handling(conversation.id, received_at=received_at):
        submission = await _submit(
            store,
            queue,
            conversation,
            text=text,
            author_id=author_id,
            author_name=author_name,
            message_id=message_id,
            max_chars=max_chars,
            dedupe_id=dedupe_id,
            timestamp=timestamp,
            stop=stop,
            give_up_after_s=give_up_after_s,
            direct=direct,
            is_agent=is_agent,
            received_at=received_at,
        )
    metrics.message_received(conversation.platform, submission.outcome.value)
    return submission


async def _submit(
    store: ConversationStore,
    queue: JobQueue,
    conversation: ConversationKey,
    *,
    text: str | bytes,
    author_id: str,
    author_name: str,
    message_id: str,
    max_chars: int,
    dedupe_id: str | None = None,
    timestamp: float | None = None,
    stop: asyncio.Event | None = None,
    give_up_after_s: float | None = None,
    direct: bool = False,
    is_agent: Callable[[], Awaitable[bool]] | None = None,
    received_at: float,
) -> Submission:
    give_up_at = None if give_up_after_s is None else time.monotonic() + give_up_after_s
    retry = Retry(stop, give_up_at)
    dedupe = dedupe_id or message_id
    config, handoff, admitted = await _read_situation(store, queue, conversation, dedupe, retry)
    if not config.allows(conversation.channel, direct=direct):
        why = "channel not enabled" if config.served else "workspace not listed"
        log.debug("%s: %s (workspace settings, CHATBOT_WORKSPACES)", conversation.id, why)
        return Submission(Outcome.NOT_ALLOWED)
    clean = clean_user_text(text, max_chars)
    if not clean.text:
        return Submission(Outcome.REJECTED, reply_text=EMPTY_MESSAGE_REPLY)
    if clean.truncated:
        log.info(
            "message %s in %s shortened to %d characters", message_id, conversation.id, max_chars
        )
    agent = handoff is not None and is_agent is not None and await is_agent()
    if handoff is None:
        refused = await _admission(store, conversation, author_id, admitted, retry)
        if refused is not None:
            return refused
    message = Message(
        role=Role.HUMAN_AGENT if agent else Role.USER,
        text=clean.text,
        author_id=author_id,
        author_name=clean_name(author_name),
        message_id=message_id,
        timestamp=time.time() if timestamp is None else timestamp,
    )
    submission = await _store_and_enqueue(
        store,
        queue,
        conversation,
        message,
        dedupe,
        handoff is not None,
        retry,
        received_at,
    )
    return replace(submission, truncated=clean.truncated)


@dataclass(frozen=True)
class _Admitted:
    """What admission reads (with the conversation's settings, in one round trip)."""

    retried: bool  # a platform's retry of a message admitted before
    waiting: int  # jobs in the queue


async def _admission(
    store: ConversationStore,
    conversation: ConversationKey,
    author_id: str,
    admitted: _Admitted,
    retry: Retry,
) -> Submission | None:
    """None when the message may be queued; else what to answer instead."""
    settings, platform = store.settings, conversation.platform
    # A platform's retry of a message admitted before is not a new message: it must not
    # count against the user's rate, nor be refused because the queue has filled since.
    if admitted.retried:
        return None
    if admitted.waiting >= settings.max_queued_jobs:
        log.warning(
            "job queue holds %d jobs or more (CHATBOT_MAX_QUEUED_JOBS): a message was refused",
            settings.max_queued_jobs,
        )
        return Submission(Outcome.BUSY, reply_text=BUSY_TEXT)
    limiter = RateLimiter(store.redis, store.keys, *settings.user_rate)
    decision = await retry("checking the user's rate", lambda: limiter.check(platform, author_id))
    if decision.allowed:
        return None
    log.info("%s user %s is past CHATBOT_USER_RATE: message not queued", platform, author_id)
    await retry(
        "counting a rate-limited message",
        lambda: store.redis.hincrby(
            store.keys.stats(platform, conversation.workspace), "rate_limited", 1
        ),
    )
    return Submission(Outcome.RATE_LIMITED, reply_text=RATE_LIMITED_TEXT if decision.notify else "")


async def _read_situation(
    store: ConversationStore,
    queue: JobQueue,
    conversation: ConversationKey,
    dedupe: str,
    retry: Retry,
) -> tuple[WorkspaceConfig, Handoff | None, _Admitted]:
    """The workspace's settings, the handoff state and what admission needs: four reads,
    side by side (the client sends them in one round trip), retried together (one log line
    and one back-off while Redis is away, not four)."""
    workspaces = Workspaces(store.redis, store.keys, store.settings)
    handoffs = Handoffs(store.redis, store.keys, store.ttl_s)
    seen = store.keys.seen(conversation, dedupe)
    config, handoff, retried, waiting = await retry(
        "reading the conversation's settings",
        lambda: together(
            workspaces.config(conversation.platform, conversation.workspace),
            handoffs.get(conversation),
            store.redis.exists(seen),
            queue.waiting(),
        ),
    )
    return config, handoff, _Admitted(bool(retried), int(waiting))


async def _store_and_enqueue(
    store: ConversationStore,
    queue: JobQueue,
    conversation: ConversationKey,
    message: Message,
    dedupe: str,
    handed_off: bool,
    retry: Retry,
    received_at: float,
) -> Submission:
    """Store (once per `dedupe` id), index, then enqueue a job unless a person has it."""
    added = await retry(
        "storing a message", lambda: store.add_message(conversation, message, dedupe)
    )
    if not added.is_new and added.settled:
        return Submission(Outcome.DUPLICATE, seq=added.seq)
    user_data = UserData(store.redis, store.keys, store.ttl_s)
    steps: list[Awaitable[object]] = [
        retry(
            "indexing the user's conversations",
            lambda: user_data.note_participation(
                conversation.platform, message.author_id, conversation.id
            ),
        )
    ]
    if not handed_off:  # while a person has the conversation, nothing is enqueued
        steps.append(
            retry(
                "enqueueing a job",
                lambda: queue.enqueue(
                    conversation, added.seq, message.message_id, message.author_id, received_at
                ),
            )
        )
    # Both done (side by side: one round trip) before the message is marked settled.
    await together(*steps)
    await retry("marking a message settled", lambda: store.mark_settled(conversation, dedupe))
    return Submission(Outcome.HANDED_OFF if handed_off else Outcome.QUEUED, seq=added.seq)
