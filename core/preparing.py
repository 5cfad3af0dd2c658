"""Preparing a batch: for each conversation, take its lock, settle what an earlier worker
left done, and ask the answer policy; what comes out waits on the model, lock held.

Conversations are prepared side by side (each is a few Redis round trips; one after the
other they added up to most of a batch's start). A conversation whose data is bad does not
stop the others; Redis failing midway does not leave the ones already locked behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.collecting import Collector
from core.context import handling_jobs
from core.conversation import ConversationKey, Message, ReplyId, Role
from core.delivery import Delivery
from core.generation.engine import Engine, GenerationRequest
from core.generation.prompt import build_prompt
from core.jobs import Job, JobQueue
from core.plans import PlanRunner
from core.policy import AnswerPolicy, Generate, Situation
from core.redis_batching import keeps_order, together
from core.redis_conn import TRANSIENT_ERRORS
from core.settings import Settings
from core.store import ConversationLock, ConversationState, ConversationStore

log = logging.getLogger(__name__)

# How long a lock release may take when preparing a batch was cancelled midway.
RELEASE_ON_FAILURE_S = 5.0


@dataclass(frozen=True)
class _Read:
    """What the holder of a conversation's lock reads before preparing it."""

    state: ConversationState
    history: list[Message]
    situation: Situation


@dataclass
class Prepared:
    """A conversation waiting on the model: its lock is held until `release` is closed."""

    conversation: ConversationKey
    jobs: list[Job]
    newest: Message
    lock: ConversationLock
    release: contextlib.AsyncExitStack
    request: GenerationRequest
    plan: Generate


class Preparer:
    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        queue: JobQueue,
        collector: Collector,
        delivery: Delivery,
        policy: AnswerPolicy,
        plans: PlanRunner,
        engine: Callable[[], Engine],
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.collector = collector
        self.delivery = delivery
        self.policy = policy
        self.plans = plans
        self.engine = engine  # the one served now (a promotion swaps it)
        # Whether the lock and the reads may go in one round trip (`_conversation`).
        self._ordered = keeps_order(store.redis)

    async def prepare(self, jobs: list[Job]) -> tuple[list[Prepared], Exception | None]:
        """The conversations ready to generate, each holding its lock, prepared side by
        side (each is a few Redis round trips; one after the other they added up to most
        of a batch's start with many conversations), and the error when Redis became
        unreachable meanwhile: those prepared must still be started (and so release their
        locks), or the heartbeat would renew their locks for ever and their conversations
        would never be answered; the jobs of the others are taken again next step."""
        by_conversation: dict[ConversationKey, list[Job]] = defaultdict(list)
        for job in jobs:
            by_conversation[job.conversation].append(job)
        results = await asyncio.gather(
            *(self._one(c, conv_jobs) for c, conv_jobs in by_conversation.items()),
            return_exceptions=True,
        )
        prepared: list[Prepared] = []
        unreachable: Exception | None = None
        fatal: BaseException | None = None  # cancelled (shutdown): nothing is started
        for conv_jobs, result in zip(by_conversation.values(), results, strict=True):
            if isinstance(result, TRANSIENT_ERRORS):
                unreachable = result
                for job in conv_jobs:
                    self.collector.defer(job)
            elif isinstance(result, BaseException):
                fatal = result
            elif result is not None:
                prepared.append(result)
        if fatal is not None:
            for item in prepared:  # their locks are released, not left to the heartbeat
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(item.release.aclose(), RELEASE_ON_FAILURE_S)
            raise fatal
        return prepared, unreachable

    async def _one(self, conversation: ConversationKey, jobs: list[Job]) -> Prepared | None:
        try:
            with handling_jobs(conversation, jobs):  # in every log line, the metrics
                return await self._conversation(conversation, jobs)
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            # Bad data in one conversation must not stop the others: its jobs stay
            # pending, are retried, and end as dead letters with an apology.
            log.exception("preparing %s failed; its jobs will be retried", conversation.id)
            return None

    async def _conversation(
        self, conversation: ConversationKey, jobs: list[Job]
    ) -> Prepared | None:
        async with contextlib.AsyncExitStack() as stack:
            taking = stack.enter_async_context(
                self.store.lock(conversation, self.settings.lock_ttl_s)
            )
            author = max(jobs, key=lambda j: j.seq).author  # the newest message's
            results: list[Any] | None = None
            if self._ordered:
                # The reads go right behind the lock's SET NX, in the same round trip and
                # executed after it, so they read what the lock's holder may rely on;
                # they are dropped when the lock is another's.
                lock, *results = await together(taking, *self._reads(conversation, author))
            else:  # Redis Cluster: side by side is not in order; read once it is held
                lock = await taking
            if not lock.held:
                for job in jobs:  # another worker is answering; look again next step
                    self.collector.defer(job)
                return None
            if results is None:
                results = await together(*self._reads(conversation, author))
            read = self._read(results, author)
            waiting, stored, situation = await self._settle(conversation, jobs, read)
            history = await self._holding(conversation, waiting, stored) if waiting else None
            if not history:
                return None
            newest = next(m for m in reversed(history) if m.role is Role.USER)
            plan = await self.policy.decide(conversation, history, situation)
            if not isinstance(plan, Generate):
                await self.plans.carry_out(plan, conversation, waiting, newest)
                return None
            turns = build_prompt(plan.system, history, self.engine(), plan.max_new_tokens)
            request = GenerationRequest(
                str(ReplyId.answer(conversation, newest.seq)), turns, plan.max_new_tokens
            )
            # The lock stays held through generation: the worker closes `release`.
            return Prepared(conversation, waiting, newest, lock, stack.pop_all(), request, plan)
        return None  # not reached; mypy cannot tell that the stack never swallows errors

    def _reads(self, conversation: ConversationKey, author: str) -> list[Awaitable[Any]]:
        """What a holder of the lock reads: the state, the history and what the policy
        reads; for one `together` (one round trip, none nested: a nested `together`
        issues its commands a turn later, in a round trip of their own)."""
        return [
            self.store.state(conversation),
            self.store.history(conversation),
            *self.policy.read(conversation, author),
        ]

    def _read(self, results: Sequence[Any], author: str) -> _Read:
        state, history, *policy = results
        return _Read(state, history, self.policy.situation(policy, author))

    async def _settle(
        self, conversation: ConversationKey, jobs: list[Job], read: _Read
    ) -> tuple[list[Job], list[Message], Situation]:
        """Under the lock: deliver a reply a dead worker committed but never handed to the
        outbox (only here, so two workers never both deliver it), acknowledge the jobs
        already answered; return the ones still waiting, the history and what the policy
        reads."""
        state, history, situation = read.state, read.history, read.situation
        if state.pending_reply is not None:
            await self.delivery.deliver(state.pending_reply)
        await self._ack_answered(conversation, jobs, state.answered)
        return [j for j in jobs if j.seq > state.answered], history, situation

    async def _holding(
        self, conversation: ConversationKey, waiting: list[Job], history: list[Message]
    ) -> list[Message] | None:
        """The history, if it holds the messages the jobs are for (else they are dropped)."""
        users = [m for m in history if m.role is Role.USER]
        if users and users[-1].seq >= max(j.seq for j in waiting):
            return history
        log.error(
            "conversation %s has no stored message for jobs %s (expired?); dropping them",
            conversation.id,
            [j.entry_id for j in waiting],
        )
        await self.queue.ack([j.entry_id for j in waiting])
        return None

    async def _ack_answered(
        self, conversation: ConversationKey, jobs: list[Job], answered: int
    ) -> None:
        done = [j for j in jobs if j.seq <= answered]
        if done:
            log.debug(
                "jobs %s of %s already answered (up to %d): acknowledged",
                [j.entry_id for j in done],
                conversation.id,
                answered,
            )
            await self.queue.ack([j.entry_id for j in done])
