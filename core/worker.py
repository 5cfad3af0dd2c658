"""The generation worker: jobs in from a consumer group, replies out to platform outboxes.

The worker is plumbing: it reads jobs, takes each conversation's lock, asks the answer
policy (`core.policy`) what to do, carries the plan out (generating in batches across
conversations), commits the reply and hands it to the outbox.

Guarantees, with any number of workers against one Redis:

- At-least-once inside: a job is acknowledged only after its reply is committed; jobs left
  pending by a dead worker are claimed by another after `reclaim_idle_s`.
- Exactly one reply as the user sees it: a reply is committed with a Lua script that
  records the highest user message it answers (`answered`), so a redelivered or duplicated
  job for an answered message is acknowledged without a second reply.
- Continuous: a job joins the engine's running batch as soon as it is prepared, and its
  reply streams out while it is generated (`core.streaming`); the next jobs are collected
  meanwhile, up to `max_batch_size` replies in the making.
- Order within a conversation: one worker at a time holds the conversation's lock; a burst
  of messages that arrive before generation starts is answered once, with all in context.
- Poison jobs go to the dead-letter stream after `max_deliveries`, and the user gets an
  apology instead of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from redis.exceptions import ResponseError

from core import metrics
from core.answering import generate_unless_handed_off
from core.collecting import Collector
from core.context import handling_jobs
from core.conversation import ConversationKey, Message, ReplyId, Role
from core.delivery import Delivery, reply_to
from core.generation.engine import Engine, Generation, GenerationRequest
from core.generation.prompt import build_prompt
from core.jobs import Job, JobQueue, Outbox, consumer_name
from core.keys import Keys
from core.knowledge.retrieval import Retriever
from core.liveness import Liveness
from core.plans import PlanRunner
from core.policy import AnswerPolicy, Draft, Generate
from core.promotions import EngineLoader, PromotedModels
from core.redis_conn import TRANSIENT_ERRORS, Backoff, Redis, with_retry
from core.settings import Settings
from core.store import ConversationLock, ConversationStore
from core.streaming import ReplyPublisher
from core.support.feedback import Feedback
from core.support.forget import ForgetRequests
from core.support.handoff import Handoffs
from core.support.workspaces import Workspaces
from core.watermark import watermark_status

log = logging.getLogger(__name__)

STEP_FAILURE_PAUSE_S = 1.0
# How long a lock release may take when preparing a batch was cancelled midway.
RELEASE_ON_FAILURE_S = 5.0


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


class Worker:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        engine: Engine,
        consumer: str | None = None,
        retriever: Retriever | None = None,
        loader: EngineLoader | None = None,
        model: str = "",
    ) -> None:
        self.settings = settings
        self.engine = engine
        # With a loader, a promoted model replaces `model` (the one `engine` serves).
        self.promotions = PromotedModels(redis, settings, loader, model)
        keys = Keys(settings.namespace)
        self.store = ConversationStore.from_settings(redis, settings)
        self.queue = JobQueue(redis, keys, consumer or consumer_name())
        self.outbox = Outbox(redis, keys)
        self.handoffs = Handoffs(redis, keys, settings.history_ttl_s)
        self.feedback = Feedback(redis, keys, settings.history_ttl_s)
        self.delivery = Delivery(self.store, self.queue, self.outbox, self.feedback)
        workspaces = Workspaces(redis, keys, settings)
        self.forget_requests = ForgetRequests(redis, keys)
        self.policy = AnswerPolicy(
            settings, workspaces, self.handoffs, self.forget_requests, retriever
        )
        self.plans = PlanRunner(
            redis,
            settings,
            self.store,
            self.queue,
            self.outbox,
            self.delivery,
            self.handoffs,
            self.forget_requests,
        )
        self.stopping = asyncio.Event()
        self.collector = Collector(self.queue, settings, self._give_up)
        self._in_flight: dict[str, Prepared] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.liveness = Liveness(
            self.queue,
            self.store,
            min(settings.lock_ttl_s, settings.reclaim_idle_s) / 3,
            owned_jobs=self._owned_jobs,
            status=lambda: {
                "replies_published": self.delivery.replies_published,
                "in_flight": len(self._in_flight),
                "watermark": watermark_status(settings),
                "model": self.promotions.model or "bundled",
            },
        )

    @property
    def model(self) -> str:
        """The model this worker serves (CHATBOT_MODEL syntax; "" is the bundled one)."""
        return self.promotions.model

    @property
    def consumer(self) -> str:
        return self.queue.consumer

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self.stopping.set()

    async def run(self) -> None:
        await with_retry("creating the job consumer group", self.queue.ensure_group)
        log.info("worker %s ready", self.consumer)
        await with_retry("announcing the worker", self.liveness.announce)
        heartbeat = asyncio.create_task(self.liveness.run())
        backoff = Backoff("answering jobs")
        try:
            while not self.stopping.is_set():
                try:
                    await self.follow_promotions()
                    await self.step(wait=False)
                    backoff.succeeded()
                except TRANSIENT_ERRORS as exc:
                    await backoff.failed(exc)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("job stream or group vanished; recreating it")
                    await self.queue.ensure_group()
                except Exception:
                    # Never a crash loop: log it, wait, go on with the next jobs.
                    log.exception("worker step failed; going on in %.0f s", STEP_FAILURE_PAUSE_S)
                    await asyncio.sleep(STEP_FAILURE_PAUSE_S)
        finally:
            await self.drain()
            heartbeat.cancel()
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.queue.redis.delete(self.queue.keys.worker(self.consumer))
            log.info(
                "worker %s stopped after publishing %d replies",
                self.consumer,
                self.delivery.replies_published,
            )

    async def step(self, *, wait: bool = True) -> int:
        """Take as many jobs as there is room for in the batch and start answering them;
        return how many jobs were taken. With `wait`, return once they are answered;
        without, they join the engine's running batch while the next ones are collected."""
        room = self.settings.max_batch_size - len(self._answering)
        if room <= 0:
            await asyncio.wait(set(self._answering), return_when=asyncio.FIRST_COMPLETED)
            return 0
        jobs = await self.collector.collect(room)
        if not jobs:
            return 0
        prepared, unreachable = await self._prepare(jobs)
        tasks = [self._start(item) for item in prepared]
        if unreachable is not None:
            raise unreachable  # the run loop backs off; what was prepared goes on
        if wait and tasks:
            await asyncio.wait(tasks)
        return len(jobs)

    async def follow_promotions(self, *, now: bool = False) -> bool:
        """Serve the promoted model if it changed: finish the replies in hand (the jobs
        not yet taken wait in the stream), load it, swap. True when the model changed."""
        wanted = await self.promotions.due(now=now)
        if wanted is None:
            return False
        log.info("model %s is promoted: finishing the replies in hand first", wanted or "bundled")
        await self.drain()
        engine = await self.promotions.load(wanted)
        if engine is None:
            return False
        old, self.engine = self.engine, engine
        self.promotions.retire(old)
        log.info("now serving %s", wanted or "the bundled model")
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.liveness.announce()
        return True

    async def drain(self) -> None:
        """Wait for the replies being generated (on shutdown)."""
        if self._answering:
            log.info("finishing %d replies before stopping", len(self._answering))
            await asyncio.wait(set(self._answering))

    # -- preparing: lock, settle what is done, ask the policy ---------------------------

    async def _prepare(self, jobs: list[Job]) -> tuple[list[Prepared], Exception | None]:
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
            *(self._prepare_one(c, conv_jobs) for c, conv_jobs in by_conversation.items()),
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

    async def _prepare_one(self, conversation: ConversationKey, jobs: list[Job]) -> Prepared | None:
        try:
            with handling_jobs(conversation, jobs):  # in every log line, the metrics
                return await self._prepare_conversation(conversation, jobs)
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            # Bad data in one conversation must not stop the others: its jobs stay
            # pending, are retried, and end as dead letters with an apology.
            log.exception("preparing %s failed; its jobs will be retried", conversation.id)
            return None

    async def _prepare_conversation(
        self, conversation: ConversationKey, jobs: list[Job]
    ) -> Prepared | None:
        state = await self.store.state(conversation)
        if state.pending_reply is None and all(j.seq <= state.answered for j in jobs):
            await self._ack_answered(conversation, jobs, state.answered)
            return None
        async with contextlib.AsyncExitStack() as stack:
            lock = await stack.enter_async_context(
                self.store.lock(conversation, self.settings.lock_ttl_s)
            )
            if not lock.held:
                for job in jobs:  # another worker is answering; look again next step
                    self.collector.defer(job)
                return None
            waiting = await self._settle(conversation, jobs)
            history = await self._history_for(conversation, waiting) if waiting else None
            if not history:
                return None
            newest = next(m for m in reversed(history) if m.role is Role.USER)
            plan = await self.policy.decide(conversation, history)
            if not isinstance(plan, Generate):
                await self.plans.carry_out(plan, conversation, waiting, newest)
                return None
            turns = build_prompt(plan.system, history, self.engine, plan.max_new_tokens)
            request = GenerationRequest(
                str(ReplyId.answer(conversation, newest.seq)), turns, plan.max_new_tokens
            )
            # The lock stays held through generation: `_finish` closes `release`.
            return Prepared(conversation, waiting, newest, lock, stack.pop_all(), request, plan)
        return None  # not reached; mypy cannot tell that the stack never swallows errors

    async def _settle(self, conversation: ConversationKey, jobs: list[Job]) -> list[Job]:
        """Under the lock: deliver a reply a dead worker committed but never handed to the
        outbox (only here, so two workers never both deliver it), acknowledge the jobs
        already answered, and return the ones still waiting."""
        state = await self.store.state(conversation)
        if state.pending_reply is not None:
            await self.delivery.deliver(state.pending_reply)
        await self._ack_answered(conversation, jobs, state.answered)
        return [j for j in jobs if j.seq > state.answered]

    async def _history_for(
        self, conversation: ConversationKey, waiting: list[Job]
    ) -> list[Message] | None:
        """The history, if it holds the messages the jobs are for (else they are dropped)."""
        history = await self.store.history(conversation)
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

    # -- generating and committing ----------------------------------------------------

    def _start(self, item: Prepared) -> asyncio.Task[None]:
        self._in_flight[item.request.request_id] = item
        with handling_jobs(item.conversation, item.jobs):  # the task's own context
            task = asyncio.create_task(self._answer(item), name=f"answer {item.request.request_id}")
        metrics.track_batch(task)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        return task

    async def _answer(self, item: Prepared) -> None:
        """Generate one reply (streaming what may be shown), commit it, release the lock."""
        publisher = None
        if self.settings.streaming:
            draft = Draft("", meta={"user": item.newest.author_id})
            shell = reply_to(item.newest, item.conversation, draft)
            publisher = ReplyPublisher(
                self.queue.redis, self.queue.keys, self.outbox, shell, item.plan.so_far
            )
        started = time.monotonic()
        try:
            generation = await generate_unless_handed_off(
                self.engine, self.handoffs, item.conversation, item.request, publisher
            )
            if generation is None:  # a person took over: nothing more from the bot
                await self.store.mark_answered(item.conversation, item.newest.seq)
                await self.queue.ack([j.entry_id for j in item.jobs])
                return
            elapsed_s = time.monotonic() - started
            metrics.generated(item.conversation.platform, generation.new_tokens, publisher)
            log.info(
                "generated %s: %d tokens in %.2f s (%.1f tok/s, %s)",
                item.request.request_id,
                generation.new_tokens,
                elapsed_s,
                generation.new_tokens / max(elapsed_s, 1e-9),
                generation.finish_reason,
            )
            if publisher is not None:
                await publisher.stop()
            await self._finish(item, generation, publisher.shown if publisher else "")
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "could not finish %s (%s); its jobs will be retried", item.request.request_id, exc
            )
        except Exception:
            log.exception("finishing %s failed; its jobs will be retried", item.request.request_id)
        finally:
            if publisher is not None:
                await publisher.close()
            self._in_flight.pop(item.request.request_id, None)
            await item.release.aclose()  # a no-op when `_finish` released it
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.liveness.announce()

    async def _finish(self, item: Prepared, generation: Generation, shown: str = "") -> None:
        async with item.release:
            if generation.finish_reason == "error":
                await self.delivery.failed(
                    item.jobs, generation.error, self.settings.max_deliveries
                )
                return
            draft = item.plan.draft(generation.text, generation.finish_reason, shown)
            reply = reply_to(item.newest, item.conversation, draft)
            log.debug(
                "committing %s covering %d for jobs %s",
                reply.reply_id,
                reply.covers_seq,
                [(j.entry_id, j.seq) for j in item.jobs],
            )
            await self.delivery.commit(reply, [j.entry_id for j in item.jobs])

    # -- failures ---------------------------------------------------------------------

    async def _give_up(self, job: Job, reason: str) -> None:
        """Dead-letter a job and apologise, once, under the conversation lock."""
        with handling_jobs(job.conversation, [job]):
            async with self.store.lock(job.conversation, self.settings.lock_ttl_s) as lock:
                if not lock.held:
                    self.collector.defer(job)  # its conversation is busy: next step
                    return
                await self.delivery.dead_letter(job, reason)

    def _owned_jobs(self) -> list[str]:
        entry_ids = list(self.collector.deferred)
        for item in list(self._in_flight.values()):
            entry_ids += [j.entry_id for j in item.jobs]
        return entry_ids
