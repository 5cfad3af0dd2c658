"""Committing a reply once and handing it to its platform's outbox.

A reply is first committed into its conversation (`ConversationStore.commit_reply`: it
answers up to `covers_seq`, once, and waits in `pending_reply`), then published to the
outbox and confirmed. A worker that dies in between leaves `pending_reply`, which the next
holder of the conversation's lock publishes (`Preparer._settle`): at least once inside, and
the outbox records posted parts so the user sees it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from core import metrics
from core.conversation import ConversationKey, Message, Reply, ReplyId, Role
from core.errors import POLITE_FAILURE
from core.jobs import Job, JobQueue, Outbox
from core.policy import Draft, disclosure_line
from core.redis_batching import together
from core.redis_conn import with_retry
from core.store import ConversationStore
from core.support.feedback import Feedback

log = logging.getLogger(__name__)

ASSISTANT_ID = "assistant"
ASSISTANT_NAME = "Assistant"


class Delivery:
    def __init__(
        self, store: ConversationStore, queue: JobQueue, outbox: Outbox, feedback: Feedback
    ) -> None:
        self.store = store
        self.queue = queue
        self.outbox = outbox
        self.feedback = feedback
        self.replies_published = 0  # handed to an outbox (the adapters post them)

    async def commit(self, reply: Reply, entry_ids: list[str]) -> None:
        """Record the reply as the answer (once), send it, acknowledge its jobs."""
        message = assistant_message(reply)
        committed = await with_retry(
            "committing a reply", lambda: self.store.commit_reply(reply, message)
        )

        def acknowledge() -> Awaitable[Any]:
            return with_retry("acknowledging jobs", lambda: self.queue.ack(entry_ids))

        if not committed:
            log.info("reply %s was already committed by another worker; dropped", reply.reply_id)
            await acknowledge()
            return
        # Side by side (one round trip each): the count and the reply on its way; then,
        # once it is on the outbox, its confirmation and the jobs' acknowledgement (a
        # worker that dies between the two leaves either a reply that the next holder of
        # the lock publishes again, which the outbox posts once, or a job answered already,
        # which the next holder acknowledges).
        await together(
            with_retry("counting a reply", lambda: self.feedback.record_reply(reply)),
            self._publish(reply),
        )
        await together(self._confirm(reply), acknowledge())

    async def deliver(self, reply: Reply) -> None:
        """Publish a reply and clear it from `pending_reply`."""
        await self._publish(reply)
        await self._confirm(reply)

    async def _publish(self, reply: Reply) -> None:
        await with_retry("publishing a reply", lambda: self.outbox.publish(reply))
        self.replies_published += 1
        metrics.reply_sent(reply.conversation.platform, reply.kind)

    async def _confirm(self, reply: Reply) -> None:
        await with_retry("confirming a reply", lambda: self.store.clear_pending(reply))

    async def failed(self, jobs: list[Job], error: str, max_deliveries: int) -> None:
        """Jobs whose reply could not be made: retried (left pending, claimed again after
        `reclaim_idle_s`) until one reached `max_deliveries`, then dead-lettered with an
        apology. The caller holds the conversation's lock."""
        for job in jobs:
            log.error(
                "job %s of %s failed (delivery %d of %d): %s",
                job.entry_id,
                job.conversation.id,
                job.deliveries,
                max_deliveries,
                error,
            )
        if max(j.deliveries for j in jobs) >= max_deliveries:
            newest = max(jobs, key=lambda j: j.seq)
            await self.queue.ack([j.entry_id for j in jobs if j is not newest])
            await self.dead_letter(newest, error)

    async def dead_letter(self, job: Job, reason: str) -> None:
        """Apologise to the user (once) and move the job to the dead letters. The caller
        holds the conversation's lock."""
        conversation = job.conversation
        log.error("job %s of %s moved to dead letters: %s", job.entry_id, conversation.id, reason)
        apology = Reply(
            reply_id=str(ReplyId.answer(conversation, job.seq)),
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
            await self.deliver(apology)
        fields = {
            "conversation": conversation.id,
            "seq": str(job.seq),
            "message_id": job.message_id,
        }
        await with_retry(
            "dead-lettering a job", lambda: self.queue.dead_letter(job.entry_id, fields, reason)
        )


def reply_to(
    newest: Message,
    conversation: ConversationKey,
    draft: Draft,
    *,
    reply_id: str | None = None,
    covers_seq: int | None = None,
) -> Reply:
    """The reply to `newest`, covering it and the messages before it unless told."""
    return Reply(
        reply_id=reply_id or str(ReplyId.answer(conversation, newest.seq)),
        conversation=conversation,
        text=draft.text,
        reply_to=newest.message_id,
        covers_seq=newest.seq if covers_seq is None else covers_seq,
        kind=draft.kind,
        meta=draft.meta,
    )


def assistant_message(reply: Reply) -> Message:
    """The reply as the bot's turn in the conversation's history (without the disclosure
    line: the model should not learn to write it)."""
    text = reply.text
    disclosure = reply.meta.get("disclosure")
    if disclosure:
        text = text.removesuffix(f"\n\n{disclosure_line(str(disclosure))}")
    return Message(
        role=Role.ASSISTANT,
        text=text,
        author_id=ASSISTANT_ID,
        author_name=ASSISTANT_NAME,
        message_id=reply.reply_id,
        timestamp=time.time(),
    )
