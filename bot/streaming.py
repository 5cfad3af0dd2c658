"""Showing a reply while it is generated: the part every adapter shares.

The worker opens a streamed reply with a `stream` entry on the outbox and writes the text
so far to the reply's stream (core/streaming.py). The adapter replica that takes the entry
follows that stream (`StreamFollower`) and shows the text growing through its platform's
`show_partial`; the committed reply then arrives on the outbox as ever, and the poster
turns the streamed message(s) into the final ones (edits them) instead of posting anew.

- Streamed messages are recorded with the reply's posted parts, under negative numbers
  (`stream_part`): a takeover (another replica, a restarted adapter, a worker that
  regenerates the reply after a crash) edits the same messages, never posts a second reply.
- Edits are paced per channel (`ChannelPacer`, about one a second, shared by every reply in
  the channel: Discord's limit is per channel, and Slack's chat.update is rate limited).
- A partial edit and the final one never cross: both hold the reply's posting lock
  (`PostingLock`), and a partial edit is not made once the final reply has started.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from core.conversation import Reply
from core.keys import Keys
from core.redis_conn import TRANSIENT_ERRORS, Redis

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.0
# No new text for this long: stop following (the committed reply still replaces it).
FOLLOW_IDLE_S = 60.0
POSTING_LOCK_TTL_S = 30.0
POSTING_LOCK_WAIT_S = 30.0

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def stream_part(index: int) -> int:
    """The posted-parts number of the `index`-th streamed message of a reply."""
    return -(index + 1)


def streamed_messages(done: dict[int, str]) -> dict[int, str]:
    """Part index -> platform message id of a reply's streamed messages."""
    return {-(part + 1): message_id for part, message_id in done.items() if part < 0}


class ChannelPacer:
    """At most one edit per `interval_s` in each channel, shared by all replies in it."""

    def __init__(self, interval_s: float = EDIT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next_s: dict[str, float] = {}

    async def wait(self, channel: str) -> None:
        now = time.monotonic()
        at = max(now, self._next_s.get(channel, 0.0))
        self._next_s[channel] = at + self.interval_s
        if len(self._next_s) > 10_000:  # forget channels long quiet
            self._next_s = {c: t for c, t in self._next_s.items() if t > now}
        if at > now:
            await asyncio.sleep(at - now)


class PostingLock:
    """One replica at a time edits a streamed reply (a token under an expiring key)."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.redis = redis
        self.key = key
        self.token = uuid.uuid4().hex

    @asynccontextmanager
    async def held(self, wait_s: float = POSTING_LOCK_WAIT_S) -> AsyncIterator[bool]:
        deadline = time.monotonic() + wait_s
        acquired = False
        while True:
            if await self.redis.set(
                self.key, self.token, nx=True, px=int(POSTING_LOCK_TTL_S * 1000)
            ):
                acquired = True
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    await self.redis.eval(_RELEASE, 1, self.key, self.token)
                except TRANSIENT_ERRORS as exc:  # it expires on its own
                    log.warning("could not release %s: %s", self.key, exc)


# (reply, text so far, the reply's posted parts as stored) -> None; records what it posts.
ShowPartial = Callable[[Reply, str, Any], Awaitable[None]]


class StreamFollower:
    """Follows the streamed replies of one adapter process."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        show_partial: ShowPartial,
        parts_for: Callable[[Reply], Awaitable[Any]],
        pacer: ChannelPacer | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.show_partial = show_partial
        self.parts_for = parts_for
        self.pacer = pacer or ChannelPacer()
        self.following: dict[str, asyncio.Task[None]] = {}

    def follow(self, reply: Reply) -> None:
        """Show `reply` growing (once per reply in this process)."""
        if reply.reply_id in self.following:
            return
        task = asyncio.create_task(self._follow(reply), name=f"stream {reply.reply_id}")
        self.following[reply.reply_id] = task
        task.add_done_callback(lambda _: self.following.pop(reply.reply_id, None))

    def is_following(self, conversation_id: str) -> bool:
        return any(rid.startswith(conversation_id + ":") for rid in self.following)

    async def stop(self) -> None:
        for task in list(self.following.values()):
            task.cancel()
        await asyncio.gather(*self.following.values(), return_exceptions=True)

    async def _follow(self, reply: Reply) -> None:
        stream = self.keys.reply_stream(reply.conversation, reply.reply_id)
        lock = PostingLock(self.redis, self.keys.posting_lock(reply.conversation, reply.reply_id))
        cursor, pending, shown = "0-0", "", ""
        quiet_since = time.monotonic()
        try:
            while True:
                cursor, latest, done = await self._read(stream, cursor, block=True)
                pending = latest or pending
                if pending != shown:
                    await self.pacer.wait(reply.conversation.channel)
                    # What came while waiting for the channel's turn goes in this edit.
                    cursor, newer, done_meanwhile = await self._read(stream, cursor, block=False)
                    pending, done = newer or pending, done or done_meanwhile
                    async with lock.held() as held:
                        parts = await self.parts_for(reply)
                        if 0 in parts.done:  # the final reply has taken over
                            return
                        if held:
                            await self.show_partial(reply, pending, parts)
                            shown = pending
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > FOLLOW_IDLE_S:
                    return
                if done:
                    return
        except asyncio.CancelledError:
            raise
        except TRANSIENT_ERRORS as exc:
            log.warning("stopped following %s: %s", reply.reply_id, exc)
        except Exception:  # the committed reply still comes through the outbox
            log.exception("showing the partial text of %s failed", reply.reply_id)

    async def _read(self, stream: str, cursor: str, *, block: bool) -> tuple[str, str, bool]:
        """Entries after `cursor` (waiting up to a second for one if `block`): the new
        cursor, the newest text ("" if none) and whether the stream is done."""
        response: Any = await self.redis.xread({stream: cursor}, block=1000 if block else None)
        latest, done = "", False
        for _name, entries in response or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if "done" in fields:
                    done = True
                elif "text" in fields:
                    latest = str(fields["text"])
        return cursor, latest, done
