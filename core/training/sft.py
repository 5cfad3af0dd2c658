"""`chatbot train sft`: fine-tune the chat model on dialogues with TRL's `SFTTrainer`.

Rows are prompt/completion pairs per assistant turn (`core.training.data`), tokenised here
with the model's own chat template and handed to TRL with their labels: the loss is on the
assistant's tokens only (its end-of-turn marker included), never on the customer's.

On a CPU: `use_cpu`, float32 (bf16 training only on CUDA), no packing (padding-free
packing is only correct under FlashAttention), no gradient checkpointing. `--lora` trains a
PEFT LoRA adapter on every linear layer and merges it into the weights at the end, so the
output is a plain model directory either way: weights, tokenizer and chat template, which
`CHATBOT_MODEL` and the workers load like any other. Checkpoints go to `OUT/checkpoints`;
`--resume` continues from the newest. The output may not be the model being served.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError
from core.training.data import Row, tokenize_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 4
    max_tokens: int = 1024
    lora: bool = False
    lora_rank: int = 16
    resume: bool = False
    max_steps: int = -1  # tests: stop after this many steps
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    out: Path
    rows: int
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    resumed_from_step: int = 0  # 0: trained from the start


def training_rows(tokenizer: Any, rows: Sequence[Row], max_tokens: int) -> list[dict[str, Any]]:
    """input_ids and labels (-100 outside the completion) for each row."""
    examples = []
    for row in rows:
        encoded = tokenize_row(tokenizer, row, max_tokens)
        labels = [
            token if keep else -100
            for token, keep in zip(encoded["input_ids"], encoded["completion_mask"], strict=True)
        ]
        examples.append({"input_ids": encoded["input_ids"], "labels": labels})
    return examples


def train_sft(
    model: Any, tokenizer: Any, rows: Sequence[Row], options: TrainOptions
) -> TrainResult:
    from datasets import Dataset
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    if not rows:
        raise DataError("no assistant turns to learn from")
    dataset = Dataset.from_list(training_rows(tokenizer, rows, options.max_tokens))
    config = SFTConfig(
        **common_args(options),
        max_length=options.max_tokens,
        packing=False,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(options),
    )
    return run_trainer(trainer, tokenizer, len(rows), options)


def common_args(options: TrainOptions) -> dict[str, Any]:
    """Trainer arguments every method shares: CPU or CUDA, checkpoints, progress."""
    cuda = torch.cuda.is_available()
    return {
        "output_dir": str(options.out / "checkpoints"),
        "num_train_epochs": options.epochs,
        "max_steps": options.max_steps,
        "learning_rate": options.learning_rate,
        "per_device_train_batch_size": options.batch_size,
        "gradient_checkpointing": False,
        "use_cpu": not cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "fp16": False,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "report_to": "none",
        "seed": options.seed,
        "disable_tqdm": False,
    }


def lora_config(options: TrainOptions) -> Any:
    if not options.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=options.lora_rank,
        lora_alpha=2 * options.lora_rank,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def run_trainer(trainer: Any, tokenizer: Any, rows: int, options: TrainOptions) -> TrainResult:
    """Train (resuming when asked and a checkpoint exists), merge a LoRA adapter, save."""
    started = time.monotonic()
    checkpoints = [
        int(p.name.rsplit("-", 1)[1])
        for p in (options.out / "checkpoints").glob("checkpoint-*")
        if p.name.rsplit("-", 1)[1].isdigit()
    ]
    resumed_from = max(checkpoints) if options.resume and checkpoints else 0
    trainer.train(resume_from_checkpoint=True if resumed_from else None)
    seconds = time.monotonic() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained: Any = trainer.model
    if options.lora:
        trained = trained.merge_and_unload()
    save_model(trained, tokenizer, options.out)
    result = TrainResult(
        out=options.out,
        rows=rows,
        steps=trainer.state.global_step,
        first_loss=float(losses[0]) if losses else float("nan"),
        last_loss=float(losses[-1]) if losses else float("nan"),
        seconds=round(seconds, 1),
        resumed_from_step=resumed_from,
    )
    (options.out / "training.json").write_text(
        json.dumps({**result.__dict__, "out": str(result.out), "lora": options.lora}, indent=2)
    )
    return result


def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    """A model directory `from_pretrained` loads: weights, config, tokenizer, template."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
