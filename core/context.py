"""What the code running now is about: the conversation and the jobs in hand.

An adapter sets it while it takes in a message (`core.inbound`), a worker while it handles a
conversation's jobs, an outbox consumer while it posts a reply. Every log line written
meanwhile carries its ids (`core.logs`), and the metrics read from it when the adapter
received the message (`core.metrics`). It is a context variable, so it follows the task
that set it and the tasks that task starts, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.conversation import ConversationKey
    from core.jobs import Job


@dataclass
class Handling:
    conversation: str = ""
    jobs: tuple[str, ...] = ()  # job stream entry ids
    reply: str = ""  # the reply being posted (outbox)
    # Wall-clock time (epoch seconds: it crosses processes in the job) at which the adapter
    # received the oldest message being answered; None when not known.
    received_at: float | None = None
    # When the engine gave the reply's first text (streaming), for time to first token.
    first_text_at: float | None = None


_current: ContextVar[Handling | None] = ContextVar("chatbot_handling", default=None)


def current() -> Handling | None:
    return _current.get()


@contextmanager
def handling(
    conversation: str,
    jobs: Sequence[str] = (),
    received_at: float | None = None,
    reply: str = "",
) -> Iterator[Handling]:
    """Within the block (and in the tasks started in it) the code is about this."""
    context = Handling(conversation, tuple(jobs), reply, received_at)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def handling_jobs(conversation: ConversationKey, jobs: Sequence[Job]) -> ContextManager[Handling]:
    """`handling` a worker's jobs: received when the oldest of their messages was."""
    received = [job.received_at for job in jobs if job.received_at]
    return handling(
        conversation.id, [job.entry_id for job in jobs], min(received) if received else None
    )
