"""An OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `transformers serve`)
behind the `Engine` contract, for when one machine's model is not enough
(`CHATBOT_ENGINE_URL`).

The rest of the pipeline is unchanged: the worker builds the prompt, streams the reply and
checks it as it would a local model's. Replies stream over Server-Sent Events through the
official `openai` client (`AsyncOpenAI`, one shared client). A failure before the first
token is retried (the server may be restarting); after it, the request fails and the
worker's own retries and dead letters take over (the user gets an apology, never
silence). Cancelling a request closes its stream, which servers take as an abort.

Prompt budgets are counted with a local tokenizer (the bundled model's, unless
`CHATBOT_MODEL` names a local one): an estimate for another model's tokenizer, so the
context budget keeps a margin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from core.generation.engine import (
    ChatTurn,
    Generation,
    GenerationRequest,
    TextListener,
    failed,
)
from core.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # between two chunks of a stream
ATTEMPTS_BEFORE_FIRST_TOKEN = 3
RETRY_PAUSE_S = 1.0
CONTEXT_MARGIN = 0.9  # another model's tokenizer may count more tokens than ours


class RemoteEngineError(Exception):
    pass


class RemoteEngine:
    def __init__(self, settings: Settings, tokenizer: Any, client: Any | None = None) -> None:
        import openai

        self.settings = settings
        self.tokenizer = tokenizer
        self.model = settings.engine_model or "default"
        self.client = client or openai.AsyncOpenAI(
            base_url=settings.engine_url,
            api_key=settings.engine_api_key or "none",
            timeout=openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            max_retries=0,  # retried here, and only before the first token
        )

    @property
    def context_tokens(self) -> int:
        return int(self.settings.context_tokens * CONTEXT_MARGIN)

    def count_tokens(self, turns: Sequence[ChatTurn]) -> int:
        text = self.tokenizer.apply_chat_template(
            list(turns), tokenize=False, add_generation_prompt=True
        )
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return str(self.tokenizer.decode(ids[:max_tokens]))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self.stream(r, None) for r in requests)))

    async def stream(self, request: GenerationRequest, on_text: TextListener | None) -> Generation:
        for attempt in range(1, ATTEMPTS_BEFORE_FIRST_TOKEN + 1):
            text, finish, tokens = "", "", 0
            try:
                messages: Any = [dict(turn) for turn in request.turns]
                stream: Any = await self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    max_tokens=request.max_new_tokens,
                    temperature=0.0,
                    stream=True,
                )
                try:
                    async for chunk in stream:
                        if not chunk.choices:
                            continue
                        choice = chunk.choices[0]
                        piece = choice.delta.content or "" if choice.delta else ""
                        if piece:
                            text += piece
                            tokens += 1
                            if on_text is not None:
                                on_text(text)
                        if choice.finish_reason:
                            finish = choice.finish_reason
                finally:
                    await stream.close()  # on cancellation too: the server aborts it
            except Exception as exc:  # openai's errors, and the transport's mid-stream
                if text:  # the user may have seen words: no silent second attempt
                    log.error(
                        "the engine at %s failed mid-reply: %s", self.settings.engine_url, exc
                    )
                    return failed(request, exc)
                if attempt == ATTEMPTS_BEFORE_FIRST_TOKEN:
                    log.error(
                        "the engine at %s failed %d times: %s",
                        self.settings.engine_url,
                        attempt,
                        exc,
                    )
                    return failed(request, exc)
                log.warning(
                    "the engine at %s failed (%s); trying again (%d of %d)",
                    self.settings.engine_url,
                    exc,
                    attempt + 1,
                    ATTEMPTS_BEFORE_FIRST_TOKEN,
                )
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
                continue
            if not finish:  # the stream ended without saying why: cut off
                return failed(request, RemoteEngineError("the stream ended early"))
            return Generation(
                request.request_id,
                text,
                "length" if finish == "length" else "stop",
                new_tokens=tokens,
            )
        return failed(request, RemoteEngineError("no attempt left"))  # not reached

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.close()


def load_remote_engine(settings: Settings, progress: Any) -> RemoteEngine:
    """The remote engine, with a local tokenizer to count prompt tokens."""
    from transformers import AutoTokenizer

    from core.generation.model_files import prepare_model

    _source, location = prepare_model(settings.model, settings.cache_dir, progress)
    return RemoteEngine(settings, AutoTokenizer.from_pretrained(location))
