"""Mixed-length requests: one at a time, a padded batch, and transformers' continuous batching.

Groundwork for the streaming and continuous-batching issue: real replies differ in length,
and a padded batch (what the engine does today) waits for its longest member, so every
request's reply lands when the longest is done. This runs the same N conversations
(persona + question) with per-request reply lengths drawn from a fixed list, greedy, end of
sequence disabled so that each request generates exactly its length, three ways on the
same model, device and dtype:

- sequential: `model.generate` for each request alone (batch 1);
- padded: one `model.generate` over the left-padded batch, `max_new_tokens` = the longest
  length (each request's useful tokens are its own length; the rest is waste);
- continuous: transformers' `ContinuousBatchingManager` (`init_continuous_batching`, sdpa
  attention, `num_blocks` and `max_batch_tokens` set so that it does not reserve 60 % of
  RAM), each request with its own `max_new_tokens`; each request's finish time is recorded.

Reported per mode: useful tokens per second (sum of the requests' lengths / wall time) and
each request's completion latency (median, max). The repetition penalty is off in all three
(continuous batching drops it, so the comparison stays fair).

    .venv/bin/python bench/batching.py                     # bundled model, fp32 and the CPU's bf16
    .venv/bin/python bench/batching.py --dtypes float32 --requests 8

Figures go to stdout and to bench/results/batching-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.generation.model_files import cpu_supports_bf16, load_model  # noqa: E402
from core.settings import DEFAULT_PERSONA, Settings  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
LENGTHS = (16, 96, 32, 128, 48, 24, 80, 64)  # reply lengths, cycled over the requests
QUESTIONS = (
    "How much does standard shipping cost?",
    "Can I return a tent I have used once?",
    "My order arrived damaged, what should I do?",
    "Do you ship to Canada, and how long does it take?",
    "How do I reset my password?",
    "What payment methods do you accept?",
    "Can I change the address on my order?",
    "How do loyalty points work?",
)


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        turns = [
            {"role": "system", "content": DEFAULT_PERSONA},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def summary(name: str, lengths: list[int], finished: list[float], wall: float) -> dict[str, Any]:
    return {
        "mode": name,
        "useful_tokens": sum(lengths),
        "seconds": round(wall, 2),
        "useful_tokens_per_s": round(sum(lengths) / wall, 1),
        "latency_median_s": round(statistics.median(finished), 2),
        "latency_max_s": round(max(finished), 2),
    }


def run_sequential(model: Any, inputs: list[list[int]], lengths: list[int]) -> dict[str, Any]:
    started = time.perf_counter()
    finished = []
    with torch.inference_mode():
        for ids, n in zip(inputs, lengths, strict=True):
            tensor = torch.tensor([ids], device=model.device)
            model.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            finished.append(time.perf_counter() - started)
    return summary("sequential", lengths, finished, time.perf_counter() - started)


def run_padded(model: Any, inputs: list[list[int]], lengths: list[int]) -> dict[str, Any]:
    width = max(len(i) for i in inputs)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(i)) + i for i in inputs], device=model.device)
    mask = torch.tensor(
        [[0] * (width - len(i)) + [1] * len(i) for i in inputs], device=model.device
    )
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(lengths),
            min_new_tokens=max(lengths),
            do_sample=False,
            pad_token_id=pad,
        )
    wall = time.perf_counter() - started
    return summary("padded", lengths, [wall] * len(lengths), wall)


def run_continuous(
    model: Any, inputs: list[list[int]], lengths: list[int], blocks: int, batch_tokens: int
) -> dict[str, Any]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(lengths), eos_token_id=-1)
    cb = ContinuousBatchingConfig(
        num_blocks=blocks, max_batch_tokens=batch_tokens, max_requests_per_batch=len(inputs)
    )
    model.set_attn_implementation("sdpa")
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=cb
    )
    manager.start()
    try:
        started = time.perf_counter()
        for n, (ids, length) in enumerate(zip(inputs, lengths, strict=True)):
            manager.add_request(ids, request_id=f"r{n}", max_new_tokens=length, eos_token_id=-1)
        finished: dict[str, float] = {}
        produced: dict[str, int] = {}
        while len(finished) < len(inputs):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("continuous batching stopped before every request finished")
            if result.is_finished():
                finished[result.request_id] = time.perf_counter() - started
                produced[result.request_id] = len(result.generated_tokens)
        wall = time.perf_counter() - started
    finally:
        manager.stop(block=True)
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
    result = summary("continuous", lengths, list(finished.values()), wall)
    result["generated_tokens"] = sum(produced.values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--dtypes", nargs="+", default=None, help="default: float32 (+ bfloat16 when native)"
    )
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    dtypes = args.dtypes or (["float32", "bfloat16"] if cpu_supports_bf16() else ["float32"])
    settings = Settings.from_mapping({})
    results = []
    for dtype in dtypes:
        model, tokenizer, _device = load_model(
            settings.model,
            "cpu",
            dtype,
            settings.cache_dir,
            lambda line: print(line, file=sys.stderr),
        )
        for count in args.requests:
            inputs = prompts(tokenizer, count)
            lengths = [LENGTHS[i % len(LENGTHS)] for i in range(count)]
            run_padded(model, inputs[:1], [4])  # warm-up
            rows = [
                run_sequential(model, inputs, lengths),
                run_padded(model, inputs, lengths),
                run_continuous(model, inputs, lengths, args.num_blocks, args.max_batch_tokens),
            ]
            for measured in rows:
                row = {"dtype": dtype, "requests": count, **measured}
                print(json.dumps(row))
                results.append(row)
    output = args.output or RESULTS_DIR / f"batching-{'cpu'}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "native_bf16": cpu_supports_bf16(),
        },
        "lengths": list(LENGTHS),
        "torch": torch.__version__,
        "results": results,
    }
    output.write_text(json.dumps(data, indent=2) + "\n")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
