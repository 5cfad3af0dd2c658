"""The watermark's bias on the logits, for both generation paths of the local engine.

`bias_logits` is what the continuous batcher applies to every row at every step, after the
repetition penalty, with each row's own previous token (transformers' continuous batching
hands a logits processor packed input ids, the wrong history). `WatermarkProcessor` does
the same inside a padded `model.generate` call, where transformers runs custom processors
after its own (the repetition penalty included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from core.watermark import Watermark


def bias_logits(
    logits: torch.Tensor, previous: Sequence[int], watermark: Watermark
) -> torch.Tensor:
    """`logits` [rows, vocab] with `watermark.delta` added to each row's green tokens."""
    rows, vocab_size = logits.shape
    flat = [
        torch.from_numpy(watermark.green_ids(int(prev), vocab_size)) + row * vocab_size
        for row, prev in enumerate(previous[:rows])
    ]
    biased = logits.clone()
    if flat:  # one scatter for the whole batch: a Python loop per row cost more here
        biased.view(-1)[torch.cat(flat).to(logits.device)] += watermark.delta
    return biased


class WatermarkProcessor(LogitsProcessor):
    def __init__(self, watermark: Watermark) -> None:
        self.watermark = watermark

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        previous = input_ids[:, -1].tolist()
        return bias_logits(scores, previous, self.watermark)  # type: ignore[return-value]
