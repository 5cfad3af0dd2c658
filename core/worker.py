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
from typing import Any

from redis.exceptions import ResponseError

from core import metrics
from core.answering import generate_unless_handed_off
from core.collecting import Collector
from core.context import handling_jobs
from core.delivery import Delivery, reply_to
from core.generation.engine import Engine, Generation
from core.jobs import Job, JobQueue, Outbox, consumer_name
from core.keys import Keys
from core.knowledge.retrieval import Retriever
from core.liveness import Liveness
from core.plans import PlanRunner
from core.policy import AnswerPolicy, Draft
from core.preparing import Prepared, Preparer
from core.promotions import EngineLoader, PromotedModels
from core.redis_batching import together
from core.redis_conn import TRANSIENT_ERRORS, Backoff, Redis, with_retry
from core.settings import Settings
from core.store import ConversationStore
from core.streaming import ReplyPublisher
from core.support.feedback import Feedback
from core.support.forget import ForgetRequests
from core.support.handoff import Handoffs
from core.support.workspaces import Workspaces
from core.watermark import watermark_status

log = logging.getLogger(__name__)

STEP_FAILURE_PAUSE_S = 1.0


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
        self.preparer = Preparer(
            settings,
            self.store,
            self.queue,
            self.collector,
            self.delivery,
            self.policy,
            self.plans,
            lambda: self.engine,
        )
        self._in_flight: dict[str, Prepared] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.liveness = Liveness(
            self.queue,
            self.store,
            min(settings.lock_ttl_s, settings.reclaim_idle_s) / 3,
            owned_jobs=self._owned_jobs,
            status=self._status,
        )

    def _status(self) -> dict[str, Any]:
        """What the heartbeat tells `chatbot health` besides being alive."""
        return {
            "replies_published": self.delivery.replies_published,
            "in_flight": len(self._in_flight),
            "watermark": watermark_status(self.settings),
            "model": self.promotions.model or "bundled",
        }

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
            await self.liveness.quiet()
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
        prepared, unreachable = await self.preparer.prepare(jobs)
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
            await self._finish(item, generation, publisher)
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
            self.liveness.announce_soon()

    async def _finish(
        self, item: Prepared, generation: Generation, publisher: ReplyPublisher | None = None
    ) -> None:
        """Commit the reply (or count the failure); then, side by side in one round trip,
        release the conversation's lock and close the reply's stream."""
        try:
            await self._commit(item, generation, publisher.shown if publisher else "")
        finally:
            closing = [item.release.aclose()]
            if publisher is not None:
                closing.append(publisher.close())
            await together(*closing)

    async def _commit(self, item: Prepared, generation: Generation, shown: str) -> None:
        if generation.finish_reason == "error":
            await self.delivery.failed(item.jobs, generation.error, self.settings.max_deliveries)
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
