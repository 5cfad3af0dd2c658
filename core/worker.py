"""The generation worker: jobs in from a consumer group, replies out to platform outboxes.

Guarantees, with any number of workers against one Redis:

- At-least-once inside: a job is acknowledged only after its reply is committed; jobs left
  pending by a dead worker are claimed by another after `reclaim_idle_s`.
- Exactly one reply as the user sees it: a reply is committed with a Lua script that
  records the highest user message it answers (`answered`), so a redelivered or duplicated
  job for an answered message is acknowledged without a second reply.
- Order within a conversation: one worker at a time holds the conversation's lock; a burst
  of messages that arrive before generation starts is answered once, with all in context.
- Poison jobs go to the dead-letter stream after `max_deliveries`, and the user gets an
  apology instead of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from redis.exceptions import ResponseError

from core.knowledge.answers import (
    DECLINE_TEXT,
    FORGET_DONE,
    FRUSTRATION_OFFER,
    GROUNDED_MAX_NEW_TOKENS,
    Assistant,
    Plan,
    PlanKind,
    compose_chat,
    compose_grounded,
)
from core.conversation import ConversationKey, Message, Reply, Role
from core.generation.engine import Engine, Generation, GenerationRequest
from core.errors import POLITE_FAILURE
from core.support.feedback import Feedback
from core.support.handoff import HANDOFF_NO_CONTACT, HANDOFF_STARTED, Handoffs, support_notice
from core.jobs import Job, JobQueue
from core.keys import Keys
from core.support.privacy import UserData
from core.generation.prompt import build_prompt, finalize_reply
from core.redis_conn import TRANSIENT_ERRORS, Redis, backoff_s, with_retry
from core.knowledge.retrieval import Retriever
from core.settings import Settings
from core.store import ConversationStore
from core.support.workspaces import WorkspaceConfig, Workspaces

log = logging.getLogger(__name__)

ASSISTANT_ID = "assistant"
ASSISTANT_NAME = "Assistant"


@dataclass
class Prepared:
    conversation: ConversationKey
    jobs: list[Job]
    lock_token: str
    covers_seq: int
    reply_to: str
    request: GenerationRequest
    plan: Plan
    knowledge: bool


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        engine: Engine,
        consumer: str | None = None,
        retriever: Retriever | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        keys = Keys(settings.namespace)
        self.store = ConversationStore.from_settings(redis, settings)
        self.queue = JobQueue(redis, keys, consumer or consumer_name())
        self.retriever = retriever
        self.assistant = Assistant(retriever, settings.kb_min_score)
        self.workspaces = Workspaces(redis, keys, settings)
        self.handoffs = Handoffs(redis, keys, settings.history_ttl_s)
        self.feedback = Feedback(redis, keys, settings.history_ttl_s)
        self.user_data = UserData(redis, keys, settings.history_ttl_s)
        self.stopping = asyncio.Event()
        self._deferred: dict[str, Job] = {}
        self._in_flight: dict[str, Prepared] = {}
        self._last_reclaim = 0.0
        self.replies_posted = 0
        self._started_at = time.time()
        self._heartbeat_s = min(settings.lock_ttl_s, settings.reclaim_idle_s) / 3

    @property
    def consumer(self) -> str:
        return self.queue.consumer

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self.stopping.set()

    async def run(self) -> None:
        await with_retry("creating the job consumer group", self.queue.ensure_group)
        log.info("worker %s ready", self.consumer)
        await with_retry("announcing the worker", self._announce)
        heartbeat = asyncio.create_task(self._heartbeat())
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    await self.step()
                    failures = 0
                except TRANSIENT_ERRORS as exc:
                    failures += 1
                    wait_s = backoff_s(failures)
                    log.warning(
                        "Redis unreachable (%s: %s); worker retrying in %.1f s",
                        type(exc).__name__,
                        exc,
                        wait_s,
                    )
                    await asyncio.sleep(wait_s)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("job stream or group vanished; recreating it")
                    await self.queue.ensure_group()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.queue.redis.delete(self.queue.keys.worker(self.consumer))
            log.info(
                "worker %s stopped after posting %d replies", self.consumer, self.replies_posted
            )

    async def step(self) -> int:
        """Collect a batch of jobs, answer them, and return how many jobs were handled."""
        jobs = await self._collect()
        if not jobs:
            return 0
        prepared = await self._prepare(jobs)
        if prepared:
            await self._generate_and_commit(prepared)
        return len(jobs)

    # -- collecting -------------------------------------------------------------------

    async def _collect(self) -> list[Job]:
        s = self.settings
        jobs: dict[str, Job] = dict(self._deferred)
        self._deferred.clear()
        now = time.monotonic()
        if now - self._last_reclaim >= s.reclaim_idle_s / 2:
            self._last_reclaim = now
            for entry_id, fields, deliveries in await self.queue.claim_stale(
                int(s.reclaim_idle_s * 1000), s.max_batch_size
            ):
                job = await self._parse(entry_id, fields, deliveries)
                if job is not None:
                    log.warning(
                        "claimed job %s of %s left unfinished (delivery %d)",
                        entry_id,
                        job.conversation.id,
                        deliveries,
                    )
                    jobs[entry_id] = job
        room = s.max_batch_size - len(jobs)
        if room > 0:
            block_ms = 200 if jobs else 1000
            entries = await self.queue.read_new(room, block_ms)
            if entries and len(entries) < room:
                # A short pause lets the rest of a burst arrive and join this batch.
                await asyncio.sleep(s.batch_wait_ms / 1000)
                entries += await self.queue.read_new(room - len(entries), block_ms=None)
            for entry_id, fields in entries:
                job = await self._parse(entry_id, fields, 1)
                if job is not None:
                    jobs[entry_id] = job
        runnable = []
        for job in jobs.values():
            if job.deliveries > s.max_deliveries:
                await self._give_up(job, f"delivered {job.deliveries - 1} times without success")
            else:
                runnable.append(job)
        return runnable

    async def _parse(self, entry_id: str, fields: dict[str, str], deliveries: int) -> Job | None:
        try:
            return Job.from_entry(entry_id, fields, deliveries)
        except (KeyError, ValueError) as exc:
            log.error("malformed job %s (%r): %s; moved to dead letters", entry_id, fields, exc)
            await self.queue.dead_letter(entry_id, fields, f"malformed: {exc}")
            return None

    # -- preparing --------------------------------------------------------------------

    async def _prepare(self, jobs: list[Job]) -> list[Prepared]:
        by_conversation: dict[ConversationKey, list[Job]] = defaultdict(list)
        for job in jobs:
            by_conversation[job.conversation].append(job)
        prepared = []
        for conversation, conv_jobs in by_conversation.items():
            item = await self._prepare_conversation(conversation, conv_jobs)
            if item is not None:
                prepared.append(item)
        return prepared

    async def _prepare_conversation(
        self, conversation: ConversationKey, jobs: list[Job]
    ) -> Prepared | None:
        state = await self.store.state(conversation)
        if state.pending_reply is None and all(j.seq <= state.answered for j in jobs):
            await self._ack_answered(conversation, jobs, state.answered)
            return None
        token = uuid.uuid4().hex
        if not await self.store.acquire_lock(conversation, token, self.settings.lock_ttl_s):
            for job in jobs:  # another worker is answering; look again next step
                self._deferred[job.entry_id] = job
            return None
        # Under the lock: a reply committed by a worker that died before it reached the
        # outbox is delivered now (only here, so two workers never both deliver it).
        state = await self.store.state(conversation)
        if state.pending_reply is not None:
            await self._deliver(state.pending_reply)
        waiting = [j for j in jobs if j.seq > state.answered]
        await self._ack_answered(conversation, jobs, state.answered)
        if not waiting:
            await self.store.release_lock(conversation, token)
            return None
        history = await self.store.history(conversation)
        users = [m for m in history if m.role is Role.USER]
        if not users or users[-1].seq < max(j.seq for j in waiting):
            log.error(
                "conversation %s has no stored message for jobs %s (expired?); dropping them",
                conversation.id,
                [j.entry_id for j in waiting],
            )
            await self.queue.ack([j.entry_id for j in waiting])
            await self.store.release_lock(conversation, token)
            return None
        newest = users[-1]
        if await self.handoffs.get(conversation) is not None:
            # A person has the conversation: record, stay quiet.
            await self.store.mark_answered(conversation, newest.seq)
            await self.queue.ack([j.entry_id for j in waiting])
            await self.store.release_lock(conversation, token)
            return None
        config = await self.workspaces.config(conversation.platform, conversation.workspace)
        knowledge = bool(self.retriever and await self.retriever.passage_count(config.kb))
        plan = await self.assistant.plan(history, config.persona, config.kb, knowledge=knowledge)
        if not plan.generates:
            try:
                await self._answer_without_model(conversation, waiting, newest, plan, config)
            finally:
                await self.store.release_lock(conversation, token)
            return None
        max_new_tokens = self.settings.max_new_tokens
        if plan.kind is PlanKind.GROUNDED:
            max_new_tokens = min(max_new_tokens, GROUNDED_MAX_NEW_TOKENS)
        turns = build_prompt(plan.system, history, self.engine, max_new_tokens)
        request = GenerationRequest(
            request_id=f"{conversation.id}:{newest.seq}",
            turns=turns,
            max_new_tokens=max_new_tokens,
        )
        return Prepared(
            conversation,
            waiting,
            token,
            newest.seq,
            newest.message_id,
            request,
            plan,
            knowledge,
        )

    async def _answer_without_model(
        self,
        conversation: ConversationKey,
        jobs: list[Job],
        newest: Message,
        plan: Plan,
        config: WorkspaceConfig,
    ) -> None:
        entry_ids = [j.entry_id for j in jobs]
        reply_id = f"{conversation.id}:{newest.seq}"
        if plan.kind is PlanKind.FORGET:
            await self.user_data.forget(conversation.platform, newest.author_id)
            # The conversation may be gone; nothing is committed into it again.
            await self.store.mark_answered(conversation, newest.seq)
            notice = Reply(reply_id, conversation, FORGET_DONE, newest.message_id, 0, "notice")
            await self._deliver(notice)
            await self.queue.ack(entry_ids)
            return
        if plan.kind is PlanKind.HANDOFF:
            handoff = await self.handoffs.start(
                conversation, newest.author_id, newest.author_name, "asked for a person"
            )
            contact = bool(config.support_channel)
            if handoff is not None and contact:
                await self.queue.publish(
                    support_notice(
                        conversation,
                        handoff,
                        support_channel=config.support_channel,
                        support_mention=config.support_mention,
                        reply_to=newest.message_id,
                    )
                )
            elif handoff is not None:
                log.warning(
                    "handoff in %s: no support contact is configured for %s %s; set one with "
                    "`chatbot workspace set %s %s --support-channel ID` or "
                    "CHATBOT_SUPPORT_CHANNEL",
                    conversation.id,
                    conversation.platform,
                    conversation.workspace,
                    conversation.platform,
                    conversation.workspace,
                )
            text = HANDOFF_STARTED if contact else HANDOFF_NO_CONTACT
            reply = Reply(
                reply_id,
                conversation,
                text,
                newest.message_id,
                newest.seq,
                "handoff",
                meta={"actions": ["release"]},
            )
        else:
            log.info(
                "no relevant passage for %s (best score %.3f < %.3f): declined",
                reply_id,
                plan.best_score,
                self.settings.kb_min_score,
            )
            reply = Reply(
                reply_id,
                conversation,
                DECLINE_TEXT,
                newest.message_id,
                newest.seq,
                "decline",
                meta={"actions": ["handoff"]},
            )
        await self._commit(reply, _assistant_message(reply), entry_ids)

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

    async def _generate_and_commit(self, batch: list[Prepared]) -> None:
        for item in batch:
            self._in_flight[item.request.request_id] = item
        started = time.monotonic()
        try:
            generations = await self._generate([p.request for p in batch])
            elapsed_s = time.monotonic() - started
            new_tokens = sum(g.new_tokens for g in generations)
            log.info(
                "generated %d replies, %d tokens in %.2f s (%.1f tok/s)",
                len(batch),
                new_tokens,
                elapsed_s,
                new_tokens / max(elapsed_s, 1e-9),
            )
            for item, generation in zip(batch, generations, strict=True):
                await self._finish(item, generation)
        finally:
            for item in batch:
                self._in_flight.pop(item.request.request_id, None)
        await with_retry("announcing the worker", self._announce)

    async def _generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Generations for `requests`; if the batch fails, each is tried alone so that one
        poison request cannot sink the others."""
        try:
            return await self.engine.generate(requests)
        except Exception as exc:
            log.exception("generation of a batch of %d requests failed", len(requests))
            if len(requests) == 1:
                return [Generation(requests[0].request_id, "", "error", error=repr(exc))]
        results = []
        for request in requests:
            results += await self._generate([request])
        return results

    async def _finish(self, item: Prepared, generation: Generation) -> None:
        try:
            if generation.finish_reason == "error":
                await self._failed(item, generation.error)
                return
            text = finalize_reply(generation.text, generation.finish_reason)
            meta: dict[str, object] = {"actions": ["feedback"]}
            if item.plan.kind is PlanKind.GROUNDED:
                text, sources = compose_grounded(text, item.plan.hits)
                meta["sources"] = sources
            else:
                text = compose_chat(text, knowledge=item.knowledge)
            if item.plan.offer_handoff:
                text = f"{text}\n\n{FRUSTRATION_OFFER}"
                meta["actions"] = ["feedback", "handoff"]
            reply = Reply(
                reply_id=item.request.request_id,
                conversation=item.conversation,
                text=text,
                reply_to=item.reply_to,
                covers_seq=item.covers_seq,
                meta=meta,
            )
            message = _assistant_message(reply)
            log.debug(
                "committing %s covering %d for jobs %s",
                reply.reply_id,
                reply.covers_seq,
                [(j.entry_id, j.seq) for j in item.jobs],
            )
            await self._commit(reply, message, [j.entry_id for j in item.jobs])
        finally:
            await with_retry(
                "releasing a conversation lock",
                lambda: self.store.release_lock(item.conversation, item.lock_token),
            )

    async def _commit(self, reply: Reply, message: Message | None, entry_ids: list[str]) -> None:
        committed = await with_retry(
            "committing a reply", lambda: self.store.commit_reply(reply, message)
        )
        if committed:
            await with_retry("counting a reply", lambda: self.feedback.record_reply(reply))
            await self._deliver(reply)
        else:
            log.info("reply %s was already committed by another worker; dropped", reply.reply_id)
        await with_retry("acknowledging jobs", lambda: self.queue.ack(entry_ids))

    async def _deliver(self, reply: Reply) -> None:
        await with_retry("publishing a reply", lambda: self.queue.publish(reply))
        await with_retry("confirming a reply", lambda: self.store.clear_pending(reply))
        self.replies_posted += 1

    async def _failed(self, item: Prepared, error: str) -> None:
        for job in item.jobs:
            log.error(
                "job %s of %s failed (delivery %d of %d): %s",
                job.entry_id,
                job.conversation.id,
                job.deliveries,
                self.settings.max_deliveries,
                error,
            )
        if max(j.deliveries for j in item.jobs) >= self.settings.max_deliveries:
            newest = max(item.jobs, key=lambda j: j.seq)
            await self.queue.ack([j.entry_id for j in item.jobs if j is not newest])
            await self._give_up(newest, error, lock_token=item.lock_token)
        # Otherwise the jobs stay pending; after reclaim_idle_s a worker claims them again.

    async def _give_up(self, job: Job, reason: str, lock_token: str | None = None) -> None:
        """Dead-letter a job and apologise to the user, once, under the conversation lock."""
        conversation = job.conversation
        token = lock_token or uuid.uuid4().hex
        if lock_token is None and not await self.store.acquire_lock(
            conversation, token, self.settings.lock_ttl_s
        ):
            self._deferred[job.entry_id] = job  # its conversation is busy: next step
            return
        try:
            log.error(
                "job %s of %s moved to dead letters: %s", job.entry_id, conversation.id, reason
            )
            apology = Reply(
                reply_id=f"{conversation.id}:{job.seq}",
                conversation=conversation,
                text=POLITE_FAILURE,
                reply_to=job.message_id,
                covers_seq=job.seq,
                kind="apology",
            )
            committed = await with_retry(
                "committing an apology", lambda: self.store.commit_reply(apology, None)
            )
            if committed:
                await self._deliver(apology)
            fields = {
                "conversation": conversation.id,
                "seq": str(job.seq),
                "message_id": job.message_id,
            }
            await with_retry(
                "dead-lettering a job", lambda: self.queue.dead_letter(job.entry_id, fields, reason)
            )
        finally:
            if lock_token is None:
                await self.store.release_lock(conversation, token)

    # -- keeping claims alive ---------------------------------------------------------

    async def _announce(self) -> None:
        """Tell `chatbot health` (and operators) that this worker is alive."""
        record = {
            "consumer": self.consumer,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "replies_posted": self.replies_posted,
            "in_flight": len(self._in_flight),
        }
        await self.queue.redis.set(
            self.queue.keys.worker(self.consumer),
            json.dumps(record),
            px=int(self._heartbeat_s * 3000),
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                entry_ids = list(self._deferred)
                for item in list(self._in_flight.values()):
                    entry_ids += [j.entry_id for j in item.jobs]
                    await self.store.renew_lock(
                        item.conversation, item.lock_token, self.settings.lock_ttl_s
                    )
                await self.queue.touch(entry_ids)
                await self._announce()
            except TRANSIENT_ERRORS as exc:
                log.warning("heartbeat could not reach Redis: %s", exc)


def _assistant_message(reply: Reply) -> Message:
    return Message(
        role=Role.ASSISTANT,
        text=reply.text,
        author_id=ASSISTANT_ID,
        author_name=ASSISTANT_NAME,
        message_id=reply.reply_id,
        timestamp=time.time(),
    )
