"""Replies that appear while they are generated: the worker's side.

While a reply is generated, the text that may already be shown (`Generate.so_far`: checked
the way the final reply will be, and never more than it will start with) goes to a short-
lived Redis stream per reply (`Keys.reply_stream`), each entry the whole text so far. The
first entry also puts a `stream` entry on the platform's outbox, which tells an adapter
replica to show the reply growing; the committed reply follows on the outbox as ever and
replaces what was shown in the same message (bot/streaming.py). Nothing here is needed for
the reply itself: a lost partial update costs a moment of progress, never the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from core.conversation import Reply
from core.jobs import Outbox
from core.keys import REPLY_STREAM_MAXLEN, REPLY_STREAM_TTL_S, Keys
from core.redis_batching import together
from core.redis_conn import TRANSIENT_ERRORS, Redis

log = logging.getLogger(__name__)

STREAM_KIND = "stream"  # the outbox entry that opens a streamed reply
# How often a reply's text is published while it grows; adapters pace their own edits.
PUBLISH_INTERVAL_S = 0.2


def opening(reply: Reply) -> Reply:
    """The outbox entry that opens `reply` as a stream (it names the reply and the user it
    answers, whom Slack's streaming methods want to know; no text)."""
    return Reply(
        reply_id=reply.reply_id,
        conversation=reply.conversation,
        text="",
        reply_to=reply.reply_to,
        covers_seq=reply.covers_seq,
        kind=STREAM_KIND,
        meta={"user": reply.meta["user"]} if "user" in reply.meta else {},
    )


class ReplyPublisher:
    """Publishes one reply's visible text while it is generated.

    `on_text` is the engine's listener (called on the event loop with the raw text so
    far); `visible` turns raw text into what may be shown.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        outbox: Outbox,
        reply: Reply,
        visible: Callable[[str], str],
    ) -> None:
        self.redis = redis
        self.outbox = outbox
        self.reply = reply
        self.visible = visible
        self.stream = keys.reply_stream(reply.conversation, reply.reply_id)
        self.opened = False
        self.first_text_at: float | None = None  # wall clock, for time to first token
        self._latest = ""
        self._published = ""
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def shown(self) -> str:
        """The text made visible so far (published or about to be)."""
        return self._latest

    def on_text(self, text: str) -> None:
        if self.first_text_at is None and text:
            self.first_text_at = time.time()
        if self._stopping.is_set():
            return
        shown = self.visible(text)
        if len(shown) <= len(self._latest):
            return
        self._latest = shown
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # Stopped by a flag, not by cancelling: redis-py may turn a cancellation in the
        # middle of a command into a connection error, and the task would never end.
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self._publish(self._latest)
            except TRANSIENT_ERRORS as exc:
                log.warning(
                    "could not publish the partial text of %s: %s", self.reply.reply_id, exc
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PUBLISH_INTERVAL_S)

    async def _publish(self, text: str) -> None:
        if text == self._published:
            return
        if not self.opened:
            self.opened = True  # first: a cancel mid-publish must still close it
            # The opening (on the outbox, where adapters learn of the stream) and the first
            # text go side by side, in one round trip and in this order.
            await together(self.outbox.publish(opening(self.reply)), self._append(text))
        else:
            await self._append(text)
        self._published = text

    async def _append(self, text: str) -> None:
        await self._add({"text": text})

    async def _add(self, fields: dict[Any, Any]) -> None:
        """An entry on the reply's stream, whose expiry it pushes back."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.stream, fields, maxlen=REPLY_STREAM_MAXLEN, approximate=True)
            pipe.expire(self.stream, REPLY_STREAM_TTL_S)
            await pipe.execute()

    async def stop(self) -> None:
        """Stop publishing (generation is over); the committed reply carries the rest."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def close(self) -> None:
        """Tell the adapters following this reply that no more text will come."""
        await self.stop()
        if not self.opened or self._closed:
            return
        self._closed = True  # once, however often it is called
        try:
            await self._add({"done": "1"})
        except TRANSIENT_ERRORS as exc:  # followers stop on their own when the text stops
            log.warning("could not close the stream of %s: %s", self.reply.reply_id, exc)
