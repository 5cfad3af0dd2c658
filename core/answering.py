"""Generating one reply while watching for a person to take the conversation over."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from core.conversation import ConversationKey
from core.generation.engine import Engine, Generation, GenerationRequest
from core.redis_conn import TRANSIENT_ERRORS, cancellation_lost
from core.streaming import ReplyPublisher
from core.support.handoff import Handoffs

log = logging.getLogger(__name__)

HANDOFF_CHECK_S = 1.0  # how often a reply being generated checks for a person taking over


async def generate_unless_handed_off(
    engine: Engine,
    handoffs: Handoffs,
    conversation: ConversationKey,
    request: GenerationRequest,
    publisher: ReplyPublisher | None,
) -> Generation | None:
    """The generation, stopped (its place in the batch freed) if a person takes the
    conversation over meanwhile: then what was already shown becomes the reply (the user
    saw it), or None when nothing was."""
    generating = asyncio.create_task(generate(engine, request, publisher))
    watching = asyncio.create_task(_wait_for_handoff(handoffs, conversation))
    try:
        await asyncio.wait({generating, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if generating.done():
        return generating.result()
    generating.cancel()
    log.info("%s was handed to a person: generation stopped", request.request_id)
    if publisher is None or not publisher.opened:
        return None
    return Generation(request.request_id, publisher.shown, "stop")


async def _wait_for_handoff(handoffs: Handoffs, conversation: ConversationKey) -> None:
    """Returns when a person takes `conversation` over; otherwise runs until cancelled."""
    while True:
        await asyncio.sleep(HANDOFF_CHECK_S)
        with contextlib.suppress(*TRANSIENT_ERRORS):
            if await handoffs.get(conversation) is not None:
                return
        if cancellation_lost():  # else it would watch for ever after its reply was done
            raise asyncio.CancelledError


async def generate(
    engine: Engine, request: GenerationRequest, publisher: ReplyPublisher | None
) -> Generation:
    """The generation of `request` (streamed when there is a publisher); a failure comes
    back as finish_reason "error"."""
    try:
        if publisher is None:
            [generation] = await engine.generate([request])
            return generation
        return await engine.stream(request, publisher.on_text)
    except Exception as exc:
        log.exception("generation of %s failed", request.request_id)
        return Generation(request.request_id, "", "error", error=repr(exc))
