"""`chatbot train kto` and `chatbot train dpo`: learning from what customers and agents said.

- KTO (TRL's `KTOTrainer`) learns from unpaired thumbs: each rated answer is desirable or
  undesirable on its own (`core.training.export`, kind "kto");
- DPO (TRL's `DPOTrainer`) learns from pairs: the human agent's correction chosen over the
  bot's answer it replaced (kind "dpo").

Both keep a frozen reference copy of the starting model (with `--lora`, the same weights
with the adapter switched off), so the model moves toward the preferred answers without
drifting from what it could do. Rows get the serving persona as their system turn, as in
SFT. The output is a model directory, like `train sft`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

from core.errors import DataError
from core.generation.engine import ChatTurn
from core.training.sft import TrainOptions, TrainResult, common_args, lora_config, run_trainer

Method = Literal["kto", "dpo"]
NEEDS = {"kto": ("prompt", "completion", "label"), "dpo": ("prompt", "chosen", "rejected")}
BETA = 0.1


def check_rows(method: Method, rows: Sequence[dict[str, Any]], where: str) -> None:
    if not rows:
        raise DataError(f"{where}: no {method.upper()} rows to learn from")
    for number, row in enumerate(rows, start=1):
        missing = [name for name in NEEDS[method] if name not in row]
        if missing:
            raise DataError(f"{where}: entry {number}: missing {', '.join(missing)}")
    if method == "kto" and len({bool(r["label"]) for r in rows}) < 2:
        # KTO weighs desirable against undesirable answers: with one kind only it has
        # nothing to contrast (TRL trains, but on a degenerate objective).
        raise DataError(f"{where}: KTO needs both 👍 and 👎 answers; all are of one kind")


def with_system(prompt: Sequence[ChatTurn], persona: str) -> list[ChatTurn]:
    turns = list(prompt)
    if not turns or turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": persona})
    return turns


def train_preference(
    method: Method,
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    persona: str,
    options: TrainOptions,
    where: str = "the data",
) -> TrainResult:
    from datasets import Dataset

    check_rows(method, rows, where)
    prepared = [{**row, "prompt": with_system(row["prompt"], persona)} for row in rows]
    dataset = Dataset.from_list(prepared)
    # KTO compares each answer with a mismatched one in its batch: it needs two at least.
    batch_size = max(options.batch_size, 2) if method == "kto" else options.batch_size
    args = {**common_args(options), "per_device_train_batch_size": batch_size}
    # The frozen reference: a copy of the starting weights (TRL would reload it from the
    # model's path, which a model built in memory does not have); LoRA needs none.
    reference = None if options.lora else copy.deepcopy(model).eval()
    if method == "kto":
        from trl.trainer.kto_config import KTOConfig as Config
        from trl.trainer.kto_trainer import KTOTrainer as Trainer
    else:
        from trl.trainer.dpo_config import DPOConfig as Config  # type: ignore[assignment]
        from trl.trainer.dpo_trainer import DPOTrainer as Trainer  # type: ignore[assignment]
    trainer = Trainer(
        model=model,
        ref_model=reference,
        args=Config(**args, beta=BETA, max_length=options.max_tokens),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(options),
    )
    return run_trainer(trainer, tokenizer, len(rows), options)
