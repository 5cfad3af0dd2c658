"""Continuous batching over the model's KV cache, on the engine's one thread.

A padded `generate` call decodes until its longest reply is done: a short answer waits for
the longest one, and a request that arrives a moment later waits for the whole batch. Here
the batch changes at every decoding step instead:

- a request that arrives is prefilled (with the others that arrived with it, left padded,
  up to `PREFILL_TOKENS` of prompt per step) and joins the running batch at the next step:
  its KV cache is left padded to the batch's length, or the batch's to its;
- a request that is done (a stop token, its own `max_new_tokens`, or cancelled) leaves at
  once: its rows of the cache are dropped, and columns no remaining row uses are trimmed.

Prompts that open the same way (the template's opening and the system turn: the persona,
shared by every conversation of a workspace) are prefilled from that prefix's keys and
values, computed once and kept (`core.generation.prefixes`): only what follows it goes
through the model. With the default persona that is 49 of the 63
tokens of a one-line question's prompt.

Decoding is greedy with the repetition penalty that `generate` applied (a boolean mask of
the tokens each row has seen, so the penalty costs one pass over the logits per step), then,
when a key is set, the watermark's bias on each row's own green list (`core.watermark`).
Text goes out as it grows (`on_text`, the reply so far), from the engine thread: callers
hand it to their own event loop.

transformers' own `ContinuousBatchingManager` was measured on this CPU before this was
written (bench/batching.py): it drops the repetition penalty, and its block-diagonal
attention mask made it about half as fast as padded batches here.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from core.generation.engine import FinishReason, Generation, GenerationRequest, TextListener
from core.generation.kv_cache import cache_layers, new_cache, set_kv
from core.generation.lean_decode import lean_decoder
from core.generation.prefixes import MIN_PREFIX_TOKENS, KeptPrefixes, LayerKV, Prefix
from core.generation.products import route_products
from core.generation.watermarking import bias_logits
from core.watermark import Watermark

log = logging.getLogger(__name__)

# Prompt tokens prefilled between two decoding steps: a burst of arrivals joins over a few
# steps instead of in one long prefill, so the replies already running do not stall and
# the first arrivals see words sooner (the first request always joins, whatever its size).
PREFILL_TOKENS = 512

Done = Callable[[Generation], None]


@dataclass
class Submitted:
    """A request on its way through the batcher."""

    request: GenerationRequest
    prompt_ids: list[int]
    on_text: TextListener | None
    done: Done
    prefix_tokens: int = 0  # how many of prompt_ids open every prompt with this persona
    generated: list[int] = field(default_factory=list)
    text: str = ""


@dataclass
class Batch:
    """The rows decoding together and their shared, left-padded state."""

    rows: list[Submitted]
    cache: Any  # a transformers DynamicCache: per layer keys/values [rows, heads, T, dim]
    mask: torch.Tensor  # [rows, T]: 1 where a row has a real token
    last: torch.Tensor  # [rows]: the token each row feeds next
    seen: torch.Tensor  # [rows, vocab]: tokens each row has seen (repetition penalty)


class ContinuousBatcher:
    def __init__(
        self,
        model: Any,
        *,
        executor: Executor,
        pad_id: int,
        stop_ids: Sequence[int],
        decode: Callable[[list[int]], str],
        max_batch_size: int,
        repetition_penalty: float,
        watermark: Watermark | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.pad_id = pad_id
        self.stop_ids = frozenset(stop_ids)
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.repetition_penalty = repetition_penalty
        self.watermark = watermark
        self.device = next(model.parameters()).device
        # Decoding steps without transformers' per-step overhead, where that is known to
        # compute the same logits (core/generation/lean_decode.py); prefill stays with it.
        self.lean = lean_decoder(model)
        if self.lean is not None:
            route_products(model, self.lean.products)  # prefill with the same product kernel
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._incoming: queue.SimpleQueue[Submitted] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._cancelled: set[str] = set()
        self._active: dict[int, Submitted] = {}  # taken from the queue, not yet finished
        self.prefixes = KeptPrefixes()  # used on the engine thread only
        self._can_reuse_prefixes = all(
            hasattr(layer, "replace") for layer in cache_layers(new_cache(model.config))
        )
        # Figures for tests and operators.
        self.peak_batch_size = 0
        self.decode_steps = 0
        self.prefilled_tokens = 0  # prompt tokens that went through the model

    # -- any thread -------------------------------------------------------------------

    def submit(self, item: Submitted) -> None:
        """Queue a request; the decoding loop starts on the engine thread if it is idle."""
        self._incoming.put(item)
        with self._lock:
            if self._running:
                return
            self._running = True
        self.executor.submit(self._run)

    def cancel(self, request_id: str) -> None:
        """Stop generating `request_id` at the next step and free its slot."""
        with self._lock:
            self._cancelled.add(request_id)

    # -- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        batch: Batch | None = None
        try:
            while True:
                batch = self._admit(batch)
                if batch is None:
                    with self._lock:
                        if self._incoming.empty():
                            self._running = False
                            self._cancelled.clear()
                            return
                    continue
                batch = self._step(batch)
        except BaseException as exc:  # the loop must never die with requests waiting
            log.exception("the decoding loop failed; failing the requests in it")
            for row in list(self._active.values()):
                self._finish(row, "error", error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._running = False
            if not self._incoming.empty():  # those that came meanwhile get a fresh loop
                with self._lock:
                    self._running = True
                self.executor.submit(self._run)

    def _admit(self, batch: Batch | None) -> Batch | None:
        """Prefill the requests that arrived (as many as there is room for, and about
        PREFILL_TOKENS of prompt a step, a kept prefix not counted) and merge them into the
        running batch."""
        room = self.max_batch_size - (len(batch.rows) if batch else 0)
        arrived: list[Submitted] = []
        prompt_tokens = 0
        while len(arrived) < room and prompt_tokens < PREFILL_TOKENS:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                break
            self._active[id(item)] = item
            if self._take_cancelled(item.request.request_id):
                self._finish(item, "cancelled")
            else:
                arrived.append(item)
                # What goes through the model: a kept prefix does not (once it is kept).
                prompt_tokens += len(item.prompt_ids) - len(self._prefix_of(item))
        if not arrived:
            return batch
        joining = self._prefill_all(arrived)
        if joining is not None:  # its first tokens are recorded before it joins
            self.peak_batch_size = max(
                self.peak_batch_size, len(joining.rows) + (len(batch.rows) if batch else 0)
            )
            joining = self._retire(joining)
        if joining is None:
            return batch
        return joining if batch is None else _merge(batch, joining)

    def _prefill_all(self, arrived: list[Submitted]) -> Batch | None:
        """Prefill the arrivals, those that open with the same prefix together."""
        groups: dict[Prefix, list[Submitted]] = {}
        for item in arrived:
            groups.setdefault(self._prefix_of(item), []).append(item)
        batch: Batch | None = None
        for prefix, group in groups.items():
            joining = self._prefill_group(group, prefix)
            if joining is not None:
                batch = joining if batch is None else _merge(batch, joining)
        return batch

    def _prefill_group(self, group: list[Submitted], prefix: Prefix) -> Batch | None:
        try:
            return self._prefill(group, prefix)
        except Exception:
            if len(group) == 1:
                log.exception("prefill failed for request %s", group[0].request.request_id)
                self._finish(group[0], "error", error="prefill failed")
                return None
            log.exception("prefill of %d requests failed; trying them one by one", len(group))
        batch: Batch | None = None
        for item in group:
            alone = self._prefill_group([item], prefix)
            if alone is not None:
                batch = alone if batch is None else _merge(batch, alone)
        return batch

    def _prefix_of(self, item: Submitted) -> Prefix:
        """The prefix whose keys and values `item` can start from (empty: none)."""
        size = item.prefix_tokens
        if not self._can_reuse_prefixes or size < MIN_PREFIX_TOKENS:
            return ()
        if size >= len(item.prompt_ids):  # at least one token must go through the model
            return ()
        return tuple(item.prompt_ids[:size])

    @torch.inference_mode()
    def _prefix_kv(self, prefix: Prefix) -> LayerKV:
        kept = self.prefixes.get(prefix)
        if kept is not None:
            return kept
        cache = new_cache(self.model.config)
        tokens = torch.tensor([prefix], device=self.device)
        self.model(
            input_ids=tokens,
            attention_mask=torch.ones_like(tokens),
            position_ids=torch.arange(len(prefix), device=self.device)[None, :],
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        self.prefilled_tokens += len(prefix)
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache_layers(cache)]
        self.prefixes.keep(prefix, kept)
        return kept

    @torch.inference_mode()
    def _prefill(self, arrived: list[Submitted], prefix: Prefix = ()) -> Batch:
        """One forward over the arrivals' prompts, left padded; with a `prefix`, over what
        follows it only, the prefix's keys and values copied into every row first (the
        cache's columns are then [prefix][padding][rest of the prompt])."""
        kept = len(prefix)
        rests = [item.prompt_ids[kept:] for item in arrived]
        width = max(len(rest) for rest in rests)
        input_ids = torch.full((len(arrived), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(arrived), width), dtype=torch.long)
        for row, rest in enumerate(rests):
            input_ids[row, width - len(rest) :] = torch.tensor(rest)
            mask[row, width - len(rest) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = kept + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.model.config)
        if prefix:
            rows = len(arrived)
            for layer, (keys, values) in zip(
                cache_layers(cache), self._prefix_kv(prefix), strict=True
            ):
                set_kv(layer, keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
            mask = torch.cat(
                [torch.ones((rows, kept), dtype=mask.dtype, device=self.device), mask], 1
            )
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        self.prefilled_tokens += sum(len(rest) for rest in rests)
        vocab = output.logits.shape[-1]
        seen = torch.zeros((len(arrived), vocab), dtype=torch.bool, device=self.device)
        for row, item in enumerate(arrived):
            seen[row, torch.tensor(item.prompt_ids, device=self.device).clamp(max=vocab - 1)] = True
        batch = Batch(arrived, cache, mask, input_ids[:, -1], seen)
        batch.last = self._pick(output.logits[:, -1, :], batch)
        return batch

    @torch.inference_mode()
    def _step(self, batch: Batch) -> Batch | None:
        mask = F.pad(batch.mask, (0, 1), value=1)
        if self.lean is not None:
            logits = self.lean(batch.last, mask, batch.cache)  # the cache grows in place
        else:
            output = self.model(
                input_ids=batch.last[:, None],
                attention_mask=mask,
                position_ids=batch.mask.sum(-1, keepdim=True),  # the new token's position
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: batch.cache},  # grown in place
            )
            logits = output.logits[:, -1, :]
        batch.mask = mask
        batch.last = self._pick(logits, batch)
        self.decode_steps += 1
        return self._retire(batch)

    def _pick(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The next token of every row: greedy, after the repetition penalty and then the
        watermark's bias (keyed on the token each row saw last: `batch.last`)."""
        logits = logits.float()
        penalty = self.repetition_penalty
        if penalty != 1.0:
            penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(batch.seen, penalized, logits)
        if self.watermark is not None:
            logits = bias_logits(logits, batch.last.tolist(), self.watermark)
        chosen = logits.argmax(-1)
        batch.seen[torch.arange(len(chosen), device=chosen.device), chosen] = True
        return chosen

    def _retire(self, batch: Batch) -> Batch | None:
        """Record each row's new token, finish the rows that are done, drop them."""
        chosen = batch.last.tolist()
        keep: list[int] = []
        for index, (row, token) in enumerate(zip(batch.rows, chosen, strict=True)):
            request_id = row.request.request_id
            if self._take_cancelled(request_id):
                self._finish(row, "cancelled")
                continue
            if token in self.stop_ids or token in row.request.stop_token_ids:
                self._finish(row, "stop")
                continue
            row.generated.append(token)
            self._emit(row)
            if len(row.generated) >= row.request.max_new_tokens:
                self._finish(row, "length")
                continue
            keep.append(index)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch = _select(batch, keep)
        return batch

    def _emit(self, row: Submitted) -> None:
        if row.on_text is None:
            return
        text = self.decode(row.generated)
        # A token can end inside a multi-byte character: wait for the rest of it.
        if text != row.text and not text.endswith("\ufffd"):
            row.text = text
            try:
                row.on_text(text)
            except Exception:  # a listener's failure is the caller's, not the batch's
                log.exception("text listener of %s failed", row.request.request_id)

    def _finish(self, row: Submitted, reason: str, error: str = "") -> None:
        self._active.pop(id(row), None)
        finish: FinishReason = "stop" if reason == "stop" else "length"
        if reason in ("error", "cancelled"):
            finish = "error"
        generation = Generation(
            request_id=row.request.request_id,
            text=self.decode(row.generated) if finish != "error" else "",
            finish_reason=finish,
            prompt_tokens=len(row.prompt_ids),
            new_tokens=len(row.generated),
            error=error or ("cancelled" if reason == "cancelled" else ""),
        )
        try:
            row.done(generation)
        except Exception:
            log.exception("completion callback of %s failed", row.request.request_id)

    def _take_cancelled(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
        return False


def _merge(running: Batch, joining: Batch) -> Batch:
    """One batch of both: the shorter side's cache and mask are left padded."""
    length = max(running.mask.shape[1], joining.mask.shape[1])

    def widen(tensor: torch.Tensor, by: int) -> torch.Tensor:
        return F.pad(tensor, (0, 0, by, 0)) if by else tensor

    grow_running = length - running.mask.shape[1]
    grow_joining = length - joining.mask.shape[1]
    for mine, theirs in zip(cache_layers(running.cache), cache_layers(joining.cache), strict=True):
        set_kv(
            mine,
            torch.cat([widen(mine.keys, grow_running), widen(theirs.keys, grow_joining)]),
            torch.cat([widen(mine.values, grow_running), widen(theirs.values, grow_joining)]),
        )
    running.mask = torch.cat(
        [F.pad(running.mask, (grow_running, 0)), F.pad(joining.mask, (grow_joining, 0))]
    )
    running.last = torch.cat([running.last, joining.last])
    running.seen = torch.cat([running.seen, joining.seen])
    running.rows = running.rows + joining.rows
    return running


def _select(batch: Batch, keep: list[int]) -> Batch:
    """The batch without the rows that left, and without the columns none of the rest use."""
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    used = mask.sum(0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in cache_layers(batch.cache):
        set_kv(
            layer,
            layer.keys.index_select(0, index)[:, :, start:, :],
            layer.values.index_select(0, index)[:, :, start:, :],
        )
    batch.mask = mask[:, start:]
    batch.last = batch.last.index_select(0, index)
    batch.seen = batch.seen.index_select(0, index)
    batch.rows = [batch.rows[i] for i in keep]
    return batch
