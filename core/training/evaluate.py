"""`chatbot eval`: perplexity on the assistant turns, BLEU and chrF of generated replies.

- Perplexity is exp(total log-loss / total assistant tokens) over every assistant turn of
  every dialogue, each given the turns before it (`core.training.data.tokenize_row`): one
  pooled figure, not an average of per-text perplexities (which overweights short turns).
- BLEU and chrF are sacrebleu's corpus scores (0-100) of the greedy reply the engine
  generates for each assistant turn, within the serving reply budget, against the turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core.generation.engine import GenerationRequest
from core.training.data import Row, tokenize_row


@dataclass(frozen=True)
class Evaluation:
    model: str
    dialogues: int
    assistant_turns: int
    assistant_tokens: int
    perplexity: float
    bleu: float
    chrf: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def assistant_log_loss(
    model: Any, tokenizer: Any, rows: Sequence[Row], max_tokens: int
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of assistant tokens) over `rows`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in rows:
        encoded = tokenize_row(tokenizer, row, max_tokens)
        ids = torch.tensor([encoded["input_ids"]], device=device)
        mask = torch.tensor(encoded["completion_mask"][1:], device=device, dtype=torch.bool)
        logits = model(input_ids=ids).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(losses[mask].sum())
        count += int(mask.sum())
    return total, count


def perplexity(total_loss: float, tokens: int) -> float:
    return math.exp(total_loss / tokens) if tokens else float("nan")


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(BLEU, chrF), sacrebleu corpus level, 0-100."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score
    return float(bleu), float(chrf)


async def evaluate(
    engine: Any, rows: Sequence[Row], *, model_name: str, dialogues: int, max_new_tokens: int
) -> Evaluation:
    """All the figures for one model (`engine`: a TransformersEngine) on `rows`."""
    import asyncio

    loop = asyncio.get_running_loop()
    total, tokens = await loop.run_in_executor(
        engine.executor,
        assistant_log_loss,
        engine.model,
        engine.tokenizer,
        rows,
        engine.context_tokens,
    )
    requests = [
        GenerationRequest(f"eval-{i}", list(row.prompt), max_new_tokens)
        for i, row in enumerate(rows)
    ]
    generations = await engine.generate(requests)
    bleu, chrf = corpus_scores([g.text.strip() for g in generations], [r.completion for r in rows])
    return Evaluation(
        model=model_name,
        dialogues=dialogues,
        assistant_turns=len(rows),
        assistant_tokens=tokens,
        perplexity=round(perplexity(total, tokens), 4),
        bleu=round(bleu, 2),
        chrf=round(chrf, 2),
    )
