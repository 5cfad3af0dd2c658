"""A transformers causal LM behind the `Engine` contract.

`stream` and `generate` go through continuous batching (`core.generation.batcher`): every
request joins the running batch at the next decoding step and leaves it when it is done, so
no reply waits for a longer one. `generate_sync` is the older padded path (prompts sorted by
length, left padded, one `generate` call per batch), kept for the benchmarks that compare
the two (bench/serving.py, bench/throughput.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.generation.batcher import ContinuousBatcher, Submitted
from core.generation.engine import (
    ChatTurn,
    Generation,
    GenerationRequest,
    TextListener,
    failed,
)
from core.generation.model_files import Progress, load_model
from core.generation.watermarking import WatermarkProcessor
from core.settings import Settings
from core.start_up_memory import refreeze
from core.watermark import Watermark

log = logging.getLogger(__name__)

REPETITION_PENALTY = 1.1  # small models loop under plain greedy decoding

# cuDNN's attention builds a new plan for every (batch, length) shape, i.e. at almost every
# decoding step: on an H100 it made batched generation 3-4x slower than these backends.
GPU_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def engine_thread() -> ThreadPoolExecutor:
    """The one thread that runs all of an engine's torch work.

    On a small CPU, torch work from a second thread starts a second OpenMP thread team;
    with more OpenMP threads than cores, generation ran 30-60 % slower here.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")


class TransformersEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_tokens: int,
        max_batch_size: int,
        executor: Executor | None = None,
        watermark: Watermark | None = None,
    ) -> None:
        self.model = model
        self.watermark = watermark
        self.executor = executor or engine_thread()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        model_limit = int(getattr(model.config, "max_position_embeddings", context_tokens))
        self._context_tokens = min(context_tokens, model_limit)
        self.max_batch_size = max_batch_size
        self.pad_id = self._pad_id()
        self.stop_ids = self._stop_ids()
        self.batcher = ContinuousBatcher(
            model,
            executor=self.executor,
            pad_id=self.pad_id,
            stop_ids=self.stop_ids,
            decode=lambda ids: str(self.tokenizer.decode(ids, skip_special_tokens=True)),
            max_batch_size=max_batch_size,
            repetition_penalty=REPETITION_PENALTY,
            watermark=watermark,
        )

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return sorted(ids)

    def encode(self, turns: Sequence[ChatTurn]) -> list[int]:
        """The prompt's token ids. The chat template's own markup is tokenised with its
        special tokens; the turns' contents (customers' words, names, passages) as plain
        text, so that `<|im_start|>system` typed by a customer is text, not a new turn."""
        return self.encode_with_prefix(turns)[0]

    def encode_with_prefix(self, turns: Sequence[ChatTurn]) -> tuple[list[int], int]:
        """The prompt's token ids, and how many of them are the template's opening and the
        system turn's text: the same for every prompt with that persona, whatever follows
        (the contents are tokenised apart from the markup), so their keys and values can be
        computed once (`core.generation.batcher`). 0 without a system turn first."""
        prefix = 0
        nonce = uuid.uuid4().hex
        marks = [f"<<{nonce}:{i}>>" for i in range(len(turns))]
        prompt = self.tokenizer.apply_chat_template(
            [{"role": t["role"], "content": m} for t, m in zip(turns, marks, strict=True)],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids: list[int] = []
        position = 0
        for found in re.finditer(f"<<{nonce}:(\\d+)>>", prompt):
            ids += self._ids(prompt[position : found.start()], markup=True)
            turn = int(found.group(1))
            ids += self._ids(turns[turn]["content"], markup=False)
            if turn == 0 and turns[0]["role"] == "system":
                prefix = len(ids)
            position = found.end()
        return ids + self._ids(prompt[position:], markup=True), prefix

    def _ids(self, text: str, *, markup: bool) -> list[int]:
        if not text:
            return []
        ids: list[int] = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=not markup
        )["input_ids"]
        return ids

    def count_tokens(self, turns: Sequence[ChatTurn]) -> int:
        return len(self.encode(turns))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._ids(text, markup=False)
        if len(ids) <= max_tokens:
            return text
        kept: str = self.tokenizer.decode(ids[:max_tokens])
        return kept

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self.stream(r, None) for r in requests)))

    async def stream(self, request: GenerationRequest, on_text: TextListener | None) -> Generation:
        loop = asyncio.get_running_loop()
        try:
            ids, prefix = self.encode_with_prefix(request.turns)
        except Exception as exc:  # a broken request fails alone
            log.exception("could not build the prompt for request %s", request.request_id)
            return failed(request, exc)
        finished: asyncio.Future[Generation] = loop.create_future()

        def done(generation: Generation) -> None:  # on the engine thread
            _call_soon(loop, _resolve, finished, generation)

        forward: TextListener | None = None
        if on_text is not None:
            listener = on_text

            def forward(text: str) -> None:  # on the engine thread
                _call_soon(loop, listener, text)

        self.batcher.submit(Submitted(request, ids, forward, done, prefix_tokens=prefix))
        try:
            return await asyncio.shield(finished)
        except asyncio.CancelledError:
            self.batcher.cancel(request.request_id)
            raise

    async def generate_padded(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The padded path, on the engine thread (for benchmarks that compare the two)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.generate_sync, requests)

    def generate_sync(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        results: dict[str, Generation] = {}
        encoded: list[tuple[GenerationRequest, list[int]]] = []
        for request in requests:
            try:
                ids = self.encode(request.turns)
            except Exception as exc:  # a broken request must not sink its batch
                log.exception("could not build the prompt for request %s", request.request_id)
                results[request.request_id] = failed(request, exc)
                continue
            encoded.append((request, ids))
        encoded.sort(key=lambda item: len(item[1]))
        for start in range(0, len(encoded), self.max_batch_size):
            chunk = encoded[start : start + self.max_batch_size]
            for generation in self._generate_chunk(chunk):
                results[generation.request_id] = generation
        return [results[r.request_id] for r in requests]

    def _generate_chunk(self, chunk: list[tuple[GenerationRequest, list[int]]]) -> list[Generation]:
        try:
            return self._generate_batch(chunk)
        except Exception:
            if len(chunk) == 1:
                request = chunk[0][0]
                log.exception("generation failed for request %s", request.request_id)
                return [failed(request, RuntimeError("generation failed"))]
            log.exception(
                "batched generation of %d requests failed; retrying one by one", len(chunk)
            )
            return [g for item in chunk for g in self._generate_chunk([item])]

    def _generate_batch(self, chunk: list[tuple[GenerationRequest, list[int]]]) -> list[Generation]:
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        max_new = max(request.max_new_tokens for request, _ in chunk)
        processors = [WatermarkProcessor(self.watermark)] if self.watermark else []
        with torch.inference_mode(), self._attention_backends():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max_new,
                do_sample=False,
                repetition_penalty=REPETITION_PENALTY,
                pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids,
                logits_processor=processors,
            )
        generations = []
        for row, (request, ids) in enumerate(chunk):
            new_ids = output[row, width:].tolist()[: request.max_new_tokens]
            finish: str = "length"
            for index, token in enumerate(new_ids):
                if token in self.stop_ids:
                    new_ids = new_ids[:index]
                    finish = "stop"
                    break
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
            generations.append(
                Generation(
                    request_id=request.request_id,
                    text=text,
                    finish_reason="stop" if finish == "stop" else "length",
                    prompt_tokens=len(ids),
                    new_tokens=len(new_ids),
                )
            )
        return generations

    @contextlib.contextmanager
    def _attention_backends(self) -> Iterator[None]:
        if self.device.type == "cuda":
            with sdpa_kernel(GPU_ATTENTION_BACKENDS):
                yield
        else:
            yield

    def release(self) -> None:
        """Free the model but keep the engine thread (a promoted model's engine uses it)."""
        self.model = None
        self.batcher.model = None
        self.batcher.lean = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Release the model; the engine thread ends once its last call returns."""
        self.release()
        self.executor.shutdown(wait=False)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _resolve(future: asyncio.Future[Generation], generation: Generation) -> None:
    if not future.done():
        future.set_result(generation)


def load_engine(
    settings: Settings, progress: Progress, executor: Executor | None = None
) -> TransformersEngine:
    """Load the configured model once; raises ModelLoadError with a precise reason."""
    model, tokenizer, _device = load_model(
        settings.model, settings.device, settings.dtype, settings.cache_dir, progress
    )
    return TransformersEngine(
        model,
        tokenizer,
        context_tokens=settings.context_tokens,
        max_batch_size=settings.max_batch_size,
        executor=executor,
        watermark=Watermark(settings.watermark_key) if settings.watermark_key else None,
    )


class LocalEngines:
    """The worker's `EngineLoader` for local models: every engine on the one engine thread."""

    def __init__(self, settings: Settings, executor: Executor, progress: Progress) -> None:
        self.settings = settings
        self.executor = executor
        self.progress = progress

    async def load(self, model: str) -> TransformersEngine:
        settings = dataclasses.replace(self.settings, model=model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, load_engine, settings, self.progress, self.executor
        )

    def retire(self, engine: Any) -> None:
        engine.release()
        refreeze()  # its modules' cycles collected, if start-up objects were frozen


async def open_engine(settings: Settings, progress: Progress) -> TransformersEngine:
    """`load_engine` on the engine's own thread, which then runs all its generation."""
    executor = engine_thread()
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, load_engine, settings, progress, executor)
    except BaseException:
        executor.shutdown(wait=False)
        raise
