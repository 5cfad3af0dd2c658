"""Prompts that open with the same persona are prefilled from that prefix's keys and values,
computed once (core/generation/batcher.py): the replies are the ones the model gives without
it, and only what follows the prefix goes through the model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from core.generation import prefixes as prefixes_module
from core.generation.engine import GenerationRequest
from core.generation.transformers_engine import TransformersEngine
from core.settings import DEFAULT_PERSONA, Settings

PERSONA_A = (
    "You are the support assistant of a bicycle shop. Answer in two short sentences, "
    "politely, and offer a person when you are not sure."
)
PERSONA_B = (
    "You are the help desk of an accounting application. Be precise and brief, and never "
    "guess a price; say when you do not know and offer to connect the customer to a person."
)
QUESTIONS = ["where is my parcel", "can I return a helmet I wore once?", "hi", "refund please"]


def own_engine(tiny_engine: TransformersEngine) -> TransformersEngine:
    return TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, context_tokens=512, max_batch_size=8
    )


def ask(persona: str | None, question: str, n: int, tokens: int = 20) -> GenerationRequest:
    turns: list[Any] = [{"role": "user", "content": question}]
    if persona is not None:
        turns.insert(0, {"role": "system", "content": persona})
    return GenerationRequest(f"q{n}", turns, tokens)


async def answers(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[Any]:
    replies = await asyncio.gather(*(engine.stream(r, lambda _t: None) for r in requests))
    return [(reply.text, reply.new_tokens) for reply in replies]


async def test_a_burst_with_one_persona_prefills_the_persona_once(
    tiny_engine: TransformersEngine,
) -> None:
    engine = own_engine(tiny_engine)
    requests = [ask(PERSONA_A, q, n) for n, q in enumerate(QUESTIONS)]
    alone = [engine.generate_sync([r])[0] for r in requests]  # padded path, no kept prefix
    assert await answers(engine, requests) == [(g.text, g.new_tokens) for g in alone]
    encoded = [engine.encode_with_prefix(r.turns) for r in requests]
    prefix = encoded[0][1]
    assert prefix >= prefixes_module.MIN_PREFIX_TOKENS
    assert {tuple(ids[:prefix]) for ids, _ in encoded} == set(engine.batcher.prefixes)
    # The persona went through the model once; then only each prompt's rest.
    assert engine.batcher.prefilled_tokens == prefix + sum(len(ids) - prefix for ids, _ in encoded)
    before = engine.batcher.prefilled_tokens
    await answers(engine, requests[:1])  # a later conversation: the prefix is kept
    assert engine.batcher.prefilled_tokens - before == len(encoded[0][0]) - prefix


async def test_personas_mixed_in_one_burst_each_start_from_their_own_prefix(
    tiny_engine: TransformersEngine,
) -> None:
    engine = own_engine(tiny_engine)
    requests = [
        ask(persona, q, n)
        for n, (persona, q) in enumerate(
            [
                (PERSONA_A, QUESTIONS[0]),
                (PERSONA_B, QUESTIONS[0]),
                (None, QUESTIONS[1]),
                (PERSONA_B, QUESTIONS[3]),
                (PERSONA_A, QUESTIONS[2]),
            ]
        )
    ]
    alone = [engine.generate_sync([r])[0] for r in requests]
    assert await answers(engine, requests) == [(g.text, g.new_tokens) for g in alone]
    assert len(engine.batcher.prefixes) == 2  # A and B; the prompt with no persona has none
    assert engine.batcher.peak_batch_size == len(requests)  # they still decoded together


async def test_kept_prefixes_are_bounded(
    tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefixes_module, "PREFIX_ENTRIES", 2)
    engine = own_engine(tiny_engine)
    for n, persona in enumerate([PERSONA_A, PERSONA_B, PERSONA_A + " Be cheerful.", PERSONA_B]):
        await answers(engine, [ask(persona, "hello", n, tokens=2)])
    kept = list(engine.batcher.prefixes)
    assert len(kept) == 2
    assert kept[-1] == tuple(
        engine.encode_with_prefix(ask(PERSONA_B, "x", 0).turns)[0][: len(kept[-1])]
    )


def test_prefill_from_a_kept_prefix_gives_the_logits_of_a_whole_prefill(
    tiny_engine: TransformersEngine,
) -> None:
    """Rows of different lengths: the cache is [prefix][padding][rest] for some rows."""
    from core.generation.batcher import Submitted

    engine = own_engine(tiny_engine)
    items = []
    for n, question in enumerate(QUESTIONS):
        ids, prefix = engine.encode_with_prefix(ask(PERSONA_A, question, n).turns)
        items.append(Submitted(ask(PERSONA_A, question, n), ids, None, print, prefix))
    shared = tuple(items[0].prompt_ids[: items[0].prefix_tokens])
    chosen: list[torch.Tensor] = []
    pick = engine.batcher._pick

    def keep(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        chosen.append(logits.clone())
        return pick(logits, batch)

    engine.batcher._pick = keep  # type: ignore[method-assign]
    from_prefix = engine.batcher._prefill(items, shared)
    whole = engine.batcher._prefill(items, ())
    torch.testing.assert_close(chosen[0], chosen[1], atol=1e-5, rtol=1e-5)
    assert from_prefix.mask.shape == whole.mask.shape  # the same columns, laid out apart
    assert torch.equal(from_prefix.mask.sum(-1), whole.mask.sum(-1))


async def test_kept_prefixes_stay_within_their_bytes(
    tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = own_engine(tiny_engine)
    await answers(engine, [ask(PERSONA_A, "hello", 0, tokens=2)])
    one = engine.batcher.prefixes.nbytes()
    assert one > 0
    monkeypatch.setattr(prefixes_module, "PREFIX_BYTES", one * 2 + one // 2)  # room for two
    for n, persona in enumerate([PERSONA_A + " Today.", PERSONA_A + " Tomorrow.", PERSONA_B]):
        await answers(engine, [ask(persona, "hello", n, tokens=2)])
    assert len(engine.batcher.prefixes) == 2
    assert engine.batcher.prefixes.nbytes() <= prefixes_module.PREFIX_BYTES


@pytest.fixture(scope="module")
def fp32_engine(model_dir: Any) -> TransformersEngine:
    """The bundled model in fp32 (in bf16, which this CPU may pick, any change of batch
    layout moves logits by ~0.4 and greedy replies part ways for that reason alone)."""
    from core.generation.transformers_engine import load_engine
    from tests.conftest import CACHE_DIR

    settings = Settings.from_mapping(
        {"CHATBOT_CACHE_DIR": str(CACHE_DIR), "CHATBOT_DTYPE": "float32"}
    )
    return load_engine(settings, print)


@pytest.mark.slow
async def test_the_bundled_model_replies_the_same_with_and_without_kept_prefixes(
    fp32_engine: TransformersEngine,
) -> None:
    requests = [ask(DEFAULT_PERSONA, q, n, tokens=24) for n, q in enumerate(QUESTIONS)]
    with_prefix = await answers(fp32_engine, requests)
    assert fp32_engine.batcher.prefixes
    fp32_engine.batcher._can_reuse_prefixes = False
    try:
        without = await answers(fp32_engine, requests)
    finally:
        fp32_engine.batcher._can_reuse_prefixes = True
    assert with_prefix == without
