"""Small test doubles and waiting helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from core.conversation import ConversationKey, Reply
from core.generation.engine import ChatTurn, Generation, GenerationRequest, TextListener
from core.generation.transformers_engine import TransformersEngine
from core.inbound import Submission, submit_user_message
from core.jobs import JobQueue
from core.keys import Keys
from core.settings import Settings
from core.store import ConversationStore
from core.streaming import STREAM_KIND


class RecordingEngine:
    """The real engine, recording each batch it is given; requests whose last user turn
    contains `fail_marker` raise, as a poison job would."""

    def __init__(self, inner: TransformersEngine, fail_marker: str = "") -> None:
        self.inner = inner
        self.batches: list[list[GenerationRequest]] = []  # `generate` calls
        self.streamed: list[GenerationRequest] = []  # `stream` calls
        self.fail_marker = fail_marker

    @property
    def context_tokens(self) -> int:
        return self.inner.context_tokens

    def count_tokens(self, turns: Sequence[ChatTurn]) -> int:
        return self.inner.count_tokens(turns)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self.inner.truncate(text, max_tokens)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.batches.append(list(requests))
        if self.fail_marker and any(self.fail_marker in r.turns[-1]["content"] for r in requests):
            raise RuntimeError("poisoned request")
        return await self.inner.generate(requests)

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        self.streamed.append(request)
        if self.fail_marker and self.fail_marker in request.turns[-1]["content"]:
            raise RuntimeError("poisoned request")
        return await self.inner.stream(request, on_text)

    def close(self) -> None:
        pass

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for batch in self.batches for r in batch] + self.streamed


def make_store(redis: Any, settings: Settings) -> ConversationStore:
    return ConversationStore.from_settings(redis, settings)


async def submit(
    redis: Any,
    settings: Settings,
    conversation: ConversationKey,
    text: str,
    message_id: str,
    author: str = "u1",
) -> Submission:
    keys = Keys(settings.namespace)
    return await submit_user_message(
        make_store(redis, settings),
        JobQueue(redis, keys),
        conversation,
        text=text,
        author_id=author,
        author_name=author.upper(),
        message_id=message_id,
        max_chars=settings.max_message_chars,
    )


async def outbox(redis: Any, settings: Settings, platform: str = "test") -> list[Reply]:
    """The replies in a platform's outbox (not the entries that open a streamed one)."""
    return [r for r in await outbox_entries(redis, settings, platform) if r.kind != STREAM_KIND]


async def outbox_entries(redis: Any, settings: Settings, platform: str = "test") -> list[Reply]:
    entries = await redis.xrange(Keys(settings.namespace).outbox(platform))
    return [Reply.from_fields(fields) for _, fields in entries]


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class ScriptedEngine(RecordingEngine):
    """An engine whose answers a test writes (`answer(request) -> text`); token counting is
    the real tokenizer's. For adapter tests, where what matters is what gets posted."""

    def __init__(
        self,
        inner: TransformersEngine,
        answer: Callable[[GenerationRequest], str],
        context_tokens: int | None = None,
    ):
        super().__init__(inner)
        self.answer = answer
        # Nothing is generated, so a context larger than the inner model's is fine.
        self._context_tokens = context_tokens
        self.word_delay_s = 0.0

    @property
    def context_tokens(self) -> int:
        return self._context_tokens or self.inner.context_tokens

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.batches.append(list(requests))
        return [Generation(r.request_id, self.answer(r), "stop", new_tokens=1) for r in requests]

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        """The scripted answer, word by word (each word a moment after the last)."""
        self.streamed.append(request)
        text = self.answer(request)
        words = text.split(" ")
        for count in range(1, len(words) + 1):
            on_text(" ".join(words[:count]))
            await asyncio.sleep(self.word_delay_s)
        return Generation(request.request_id, text, "stop", new_tokens=len(words))


def echo_answer(request: GenerationRequest) -> str:
    return f"Answer to: {request.turns[-1]['content']}"


def tiny_llama(tokenizer: Any, seed: int = 0, max_positions: int = 2048) -> Any:
    """A random-weight two-layer Llama for `tokenizer` (the bundled model's real one): fast,
    and the same code paths as the real model (chat template, padding, batching, training)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)
