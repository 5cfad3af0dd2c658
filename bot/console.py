"""The console channel: talk to the bot in a terminal, through Redis and the worker.

It is an adapter like any other: messages go in through `submit_user_message`, replies come
back on the `console` outbox. With a terminal it is interactive; with piped input it answers
each line and exits at end of input.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import threading
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, TextIO

from core.admission import RATE_LIMITED_TEXT
from core.conversation import ConversationKey, Reply
from core.inbound import Outcome, submit_user_message
from core.jobs import JobQueue
from core.keys import Keys
from core.redis_conn import Redis, with_retry
from core.settings import Settings
from core.store import ConversationStore
from core.streaming import STREAM_KIND

log = logging.getLogger(__name__)

PLATFORM = "console"
QUIT_WORDS = {"/quit", "/exit", "/q"}
NO_REPLY = (
    "Sorry, no answer came in time. Is a worker running (`chatbot worker`)? "
    "Your message is saved and will be answered when one is."
)


class _StdinReader:
    """Lines from stdin, read in a daemon thread so that shutdown never waits on input.

    Interactively, the next prompt is shown only after the previous answer (`want_next`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: str, interactive: bool) -> None:
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = loop
        self._prompt = prompt
        self._interactive = interactive
        self._next = threading.Event()
        self._next.set()
        threading.Thread(target=self._read, name="console-stdin", daemon=True).start()

    def want_next(self) -> None:
        self._next.set()

    def _read(self) -> None:
        while True:
            if self._interactive:
                self._next.wait()
                self._next.clear()
            try:
                raw = input(self._prompt) if self._interactive else sys.stdin.buffer.readline()
            except (EOFError, KeyboardInterrupt, OSError):
                raw = b""
            if isinstance(raw, bytes):
                text = raw.decode("utf-8", errors="replace").rstrip("\n") if raw else None
            else:
                text = raw
            self._loop.call_soon_threadsafe(self.lines.put_nowait, text)
            if text is None:
                return


class ConsoleChat:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        conversation: str = "default",
        out: TextIO = sys.stdout,
        interactive: bool | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        keys = Keys(settings.namespace)
        self.keys = keys
        self.store = ConversationStore.from_settings(redis, settings)
        self.queue = JobQueue(redis, keys)
        user = getpass.getuser()
        self.author_id = user
        self.conversation = ConversationKey(PLATFORM, "local", user, conversation)
        self.out = out
        self.interactive = sys.stdin.isatty() if interactive is None else interactive

    async def ask(
        self,
        text: str | bytes,
        stop: asyncio.Event | None = None,
        on_partial: Callable[[str], None] | None = None,
    ) -> str | None:
        """Send one message and wait for the reply to it; None if none came in time.
        While the reply is generated, `on_partial` gets its text so far."""
        outbox = self.keys.outbox(PLATFORM)
        last: Any = await with_retry(
            "reading the outbox", lambda: self.redis.xrevrange(outbox, count=1), stop=stop
        )
        cursor = last[0][0] if last else "0-0"
        submission = await submit_user_message(
            self.store,
            self.queue,
            self.conversation,
            text=text,
            author_id=self.author_id,
            author_name=self.author_id,
            message_id=uuid.uuid4().hex,
            max_chars=self.settings.max_message_chars,
            stop=stop,
        )
        if submission.outcome is Outcome.RATE_LIMITED:
            return RATE_LIMITED_TEXT
        if submission.reply_text:  # rejected or busy: say so at once
            return submission.reply_text
        if submission.outcome is Outcome.DUPLICATE:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reply_timeout_s
        cursors = {outbox: cursor}  # the outbox, and the stream of a reply being generated
        while (remaining_s := deadline - loop.time()) > 0:
            if stop is not None and stop.is_set():
                return None
            block_ms = int(min(remaining_s, 1.0) * 1000) or 1
            response: Any = await with_retry(
                "waiting for a reply", partial(self._read, cursors, block_ms), stop=stop
            )
            for stream, entries in response or []:
                for entry_id, fields in entries:
                    cursors[stream] = entry_id
                    if stream != outbox:
                        if on_partial is not None and "text" in fields:
                            on_partial(str(fields["text"]))
                        if "done" in fields:  # nothing more comes on it: stop waiting there
                            cursors.pop(stream, None)
                        continue
                    reply = Reply.from_fields(fields)
                    if reply.conversation != self.conversation or reply.covers_seq < submission.seq:
                        continue
                    if reply.kind != STREAM_KIND:
                        return reply.text
                    cursors[self.keys.reply_stream(reply.conversation, reply.reply_id)] = "0-0"
        return NO_REPLY

    async def _read(self, cursors: dict[str, str], block_ms: int) -> Any:
        """XREAD of the outbox and the reply streams, one stream at a time: they lie in
        different Redis Cluster slots. The newest reply stream blocks (it ends with a
        `done` entry); the outbox and any older ones are read without waiting after it."""
        found: list[Any] = []
        for n, (stream, cursor) in enumerate(reversed(cursors.items())):
            one: dict[Any, Any] = {stream: cursor}
            found += await self.redis.xread(one, block=block_ms if n == 0 else None) or []
        return found

    async def run(self, stop: asyncio.Event) -> None:
        """Chat until end of input, `/quit`, or `stop`."""
        if self.interactive:
            self.out.write("Chat with the support assistant. Type your question; /quit to leave.\n")
            self.out.flush()
        loop = asyncio.get_running_loop()
        reader = _StdinReader(loop, "you> ", self.interactive)
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                get_line = asyncio.create_task(reader.lines.get())
                await asyncio.wait({get_line, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not get_line.done():
                    get_line.cancel()
                    return
                line = get_line.result()
                if line is None or line.strip() in QUIT_WORDS:
                    return
                if line.strip():
                    await self._answer(line, stop)
                reader.want_next()
        finally:
            stop_wait.cancel()

    async def _answer(self, line: str, stop: asyncio.Event) -> None:
        if not self.interactive:  # piped: the complete reply, one per question
            reply = await self.ask(line, stop)
            if reply is not None:
                self.out.write(f"{reply}\n")
                self.out.flush()
            return
        self.out.write("bot> …")
        self.out.flush()
        shown = ""

        def grow(text: str) -> None:  # the words as they are generated
            nonlocal shown
            if not text.startswith(shown):
                return
            self.out.write(("\rbot> " if not shown else "") + text[len(shown) :])
            self.out.flush()
            shown = text

        reply = await self.ask(line, stop, on_partial=grow)
        if reply is None:
            self.out.write("\n")
        elif shown and reply.startswith(shown):
            self.out.write(f"{reply[len(shown) :]}\n")
        elif shown:  # the final reply differs from what was shown: say it whole
            self.out.write(f"\n{reply}\n")
        else:
            self.out.write(f"\rbot> {reply}\n")
        self.out.flush()
