"""Carrying out the plans that need no model: stay quiet, forget a user, hand over, post.

The worker holds the conversation's lock while it calls `PlanRunner.carry_out`; every plan
ends with its jobs acknowledged (with the reply committed first, where there is one).
"""

from __future__ import annotations

from core.conversation import ConversationKey, Message
from core.delivery import Delivery, reply_to
from core.jobs import Job, JobQueue, Outbox
from core.keys import Keys
from core.policy import (
    ConfirmForget,
    Draft,
    ForgetUser,
    Plan,
    PostText,
    StartHandoff,
    StayQuiet,
)
from core.redis_conn import Redis
from core.settings import Settings
from core.store import ConversationStore
from core.support.forget import ForgetRequests
from core.support.handoff import Handoffs, hand_over
from core.support.privacy import UserData


class PlanRunner:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        store: ConversationStore,
        queue: JobQueue,
        outbox: Outbox,
        delivery: Delivery,
        handoffs: Handoffs,
        forget_requests: ForgetRequests,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.outbox = outbox
        self.delivery = delivery
        self.handoffs = handoffs
        self.forget_requests = forget_requests
        self.user_data = UserData(redis, Keys(settings.namespace), settings.history_ttl_s)

    async def carry_out(
        self, plan: Plan, conversation: ConversationKey, jobs: list[Job], newest: Message
    ) -> None:
        entry_ids = [j.entry_id for j in jobs]
        if isinstance(plan, StayQuiet):  # a person has the conversation: record only
            await self.store.mark_answered(conversation, newest.seq)
            await self.queue.ack(entry_ids)
        elif isinstance(plan, ConfirmForget):
            await self.forget_requests.ask(conversation, plan.user_id)
            await self.delivery.commit(reply_to(newest, conversation, plan.reply), entry_ids)
        elif isinstance(plan, ForgetUser):
            await self.user_data.forget(
                conversation.platform,
                plan.user_id,
                holding=conversation,
                lock_wait_s=self.settings.lock_ttl_s,
            )
            # The conversation may be gone; nothing is committed into it again.
            await self.store.mark_answered(conversation, newest.seq)
            notice = Draft(plan.notice, "notice")
            await self.delivery.deliver(reply_to(newest, conversation, notice, covers_seq=0))
            await self.queue.ack(entry_ids)
        elif isinstance(plan, StartHandoff):
            await hand_over(
                self.handoffs,
                self.outbox,
                conversation,
                customer=plan.customer,
                reason=plan.reason,
                support_channel=plan.support_channel,
                support_mention=plan.support_mention,
            )
            await self.delivery.commit(reply_to(newest, conversation, plan.reply), entry_ids)
        elif isinstance(plan, PostText):
            await self.delivery.commit(reply_to(newest, conversation, plan.reply), entry_ids)
