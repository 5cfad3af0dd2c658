"""Decoding speed of the product's engine against this machine's memory-bandwidth limit.

Each decoding step at batch 1 must read every weight once, so tokens/s at batch 1 cannot
exceed (read bandwidth) / (weight bytes). The bandwidth is measured in the same run (a
torch sum over 256 MB, on the idle machine: run nothing else meanwhile), before and after
each of a few batch-1 runs, whose median share of the limit is reported. Then the engine
(continuous batching, `core/generation/batcher.py`) generates fixed-length replies (end of
sequence ignored) at batch 1, 8, 16 and 32: with its lean decoding step
(`core/generation/lean_decode.py`) on the product kernel it chose and, side by side at each
batch size, on each other kernel (MKL, oneDNN on the plain weights, oneDNN on packed
copies), and with transformers' forward in its place.

    .venv/bin/python bench/decode.py                 # fp32 (the target) on this CPU
    .venv/bin/python bench/decode.py --dtype bfloat16

Figures go to stdout and bench/results/decode-<device>-<dtype>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.generation.engine import GenerationRequest  # noqa: E402
from core.generation.lean_decode import lean_decoder  # noqa: E402
from core.generation.model_files import cpu_supports_bf16  # noqa: E402
from core.generation.transformers_engine import open_engine  # noqa: E402
from core.settings import Settings  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def read_bandwidth_gb_s() -> float:
    data = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MB
    for _ in range(3):
        data.sum()
    runs = 10
    started = time.perf_counter()
    for _ in range(runs):
        data.sum()
    return data.numel() * 4 * runs / (time.perf_counter() - started) / 1e9


async def engine_tok_s(engine: Any, batch: int, tokens: int) -> float:
    requests = [
        GenerationRequest(
            f"r{i}",
            [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": f"Question {i}: which tent suits a family of four?"},
            ],
            tokens,
        )
        for i in range(batch)
    ]
    started = time.perf_counter()
    generations = await engine.generate(requests)
    return float(sum(g.new_tokens for g in generations) / (time.perf_counter() - started))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32])
    parser.add_argument(
        "--share-rounds", type=int, default=5, help="batch-1 runs between bandwidth readings"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_mapping(
        {"CHATBOT_DTYPE": args.dtype, "CHATBOT_MAX_BATCH_SIZE": str(max(args.batches))}
    )
    # Loaded on the engine's own thread, which runs all its torch work, as the worker does
    # (torch work from a second thread made every step here 30-50 % slower).
    engine = asyncio.run(open_engine(settings, lambda *_a: None))
    engine.batcher.stop_ids = frozenset()  # every reply exactly --tokens long
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    asyncio.run(engine_tok_s(engine, 1, 4))  # warm up
    lean = engine.batcher.lean
    # The lean step with each product kernel other than the one it chose, made on the
    # engine thread too (products.choose_products).
    others: dict[str, Any] = {}
    if lean is not None:
        for kernel in ("mkl", "onednn", "onednn-packed"):
            if kernel == lean.products:
                continue
            other = engine.executor.submit(lean_decoder, engine.model, kernel).result()
            if other is not None and other.products == kernel:  # else not available here
                others[kernel] = other
    measured: dict[int, float] = {}
    measured_other: dict[str, dict[int, float]] = {kernel: {} for kernel in others}
    forward: dict[int, float] = {}
    for batch in args.batches:
        engine.batcher.lean = lean
        measured[batch] = asyncio.run(engine_tok_s(engine, batch, args.tokens))
        for kernel, other in others.items():
            engine.batcher.lean = other
            measured_other[kernel][batch] = asyncio.run(engine_tok_s(engine, batch, args.tokens))
        engine.batcher.lean = None
        forward[batch] = asyncio.run(engine_tok_s(engine, batch, args.tokens))
    engine.batcher.lean = lean
    others.clear()  # their packed copies
    # The share of the limit, from batch-1 runs each between two bandwidth readings (on
    # the engine's thread too): this machine's read bandwidth moved 35-65 GB/s within
    # minutes, so one reading at another moment made the share a lottery. After the
    # rest (a 256 MB buffer slowed what came after it).
    shares: list[dict[str, float]] = []
    for _ in range(args.share_rounds):
        before = engine.executor.submit(read_bandwidth_gb_s).result()
        tok_s = asyncio.run(engine_tok_s(engine, 1, args.tokens))
        after = engine.executor.submit(read_bandwidth_gb_s).result()
        round_limit = (before + after) / 2 * 1e9 / weight_bytes
        shares.append(
            {
                "bandwidth_gb_s": round((before + after) / 2, 1),
                "tok_s": round(tok_s, 1),
                "share_of_limit": round(tok_s / round_limit, 3),
            }
        )
    middle = sorted(shares, key=lambda r: r["share_of_limit"])[len(shares) // 2]
    bandwidth = middle["bandwidth_gb_s"]
    limit = bandwidth * 1e9 / weight_bytes
    results: dict[str, Any] = {
        "dtype": args.dtype,
        "read_bandwidth_gb_s": round(bandwidth, 2),
        "weight_mb": round(weight_bytes / 1e6, 1),
        "batch1_limit_tok_s": round(limit, 1),
        "torch_threads": torch.get_num_threads(),
        "lean_step": lean is not None,
        "lean_products": lean.products if lean is not None else None,
        "batch1_share_rounds": shares,  # the median round gives the limit above
        "engine": {},
        "engine_other_products": {  # the lean step with each other kernel
            kernel: {str(b): round(t, 1) for b, t in figures.items()}
            for kernel, figures in measured_other.items()
        },
        "engine_transformers_forward": {},
    }
    for n, r in enumerate(shares, 1):
        print(
            f"batch-1 round {n}: {r['tok_s']:.1f} tok/s at {r['bandwidth_gb_s']:.1f} GB/s"
            f" = {r['share_of_limit']:.0%} of the limit"
        )
    print(
        f"read bandwidth {bandwidth:.1f} GB/s (median round), weights {weight_bytes / 1e6:.0f} MB"
    )
    print(f"batch-1 limit {limit:.1f} tok/s; lean step products: {results['lean_products']}")
    for batch, tok_s in measured.items():
        results["engine"][str(batch)] = round(tok_s, 1)
        results["engine_transformers_forward"][str(batch)] = round(forward[batch], 1)
        share = f" = {tok_s / limit:.0%} of the median round's limit" if batch == 1 else ""
        compared = "".join(
            f", {kernel} products: {figures[batch]:6.1f}"
            for kernel, figures in measured_other.items()
        )
        print(
            f"batch {batch:>2}: engine {tok_s:6.1f} tok/s{share}"
            f" (with transformers' forward: {forward[batch]:6.1f} tok/s{compared})"
        )
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_supports_bf16(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out = RESULTS_DIR / f"decode-{engine.device.type}-{args.dtype}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
