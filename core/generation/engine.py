"""The generation contract: requests in, generations with a finish reason out.

A transformers model on this machine, a remote OpenAI-compatible server or a test double
can stand behind `Engine`; the worker knows nothing else about generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

ChatTurn = dict[str, str]  # {"role": ..., "content": ...}, as chat templates expect
FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    turns: Sequence[ChatTurn]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own end-of-turn tokens


@dataclass(frozen=True)
class Generation:
    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    new_tokens: int = 0
    error: str = ""  # for operators only, when finish_reason == "error"


def failed(request: GenerationRequest, exc: BaseException) -> Generation:
    """The Generation of a request that failed (the reason is for operators only)."""
    return Generation(request.request_id, "", "error", error=f"{type(exc).__name__}: {exc}")


# Called with the reply's text so far, each time it grows, on the caller's event loop.
TextListener = Callable[[str], None]


class Engine(Protocol):
    @property
    def context_tokens(self) -> int:
        """How many tokens prompt and reply may take together."""
        ...

    def count_tokens(self, turns: Sequence[ChatTurn]) -> int:
        """Tokens of the prompt these turns make, generation prompt included."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """`text` cut to at most `max_tokens` tokens (kept from the start)."""
        ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One Generation per request, same order. Failures of one request come back as
        finish_reason "error"; an exception means the whole call failed."""
        ...

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        """Generate one request, calling `on_text` with the text so far as it grows;
        other requests may join and leave the batch meanwhile. Cancelling the awaiting task
        stops the request and frees its place."""
        ...

    def close(self) -> None: ...
