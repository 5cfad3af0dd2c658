"""One user floods the bot; how long does another user wait for an answer?

A real worker, a real redis-server (embedded, in a temporary directory), the inbound path
of every adapter (`submit_user_message`), and a model with the bundled SmolLM2's real
tokenizer and shape-small random weights (the scheduling is measured, not the model; the
bundled model only makes each step slower). Figures go to JSON.

    .venv/bin/python bench/flood.py [--flood 48] [--repeats 3] [--out bench/results/flood.json]

Three cases: the other user alone; after a flood of `--flood` messages (each in its own
conversation, as Discord mentions or Slack `/ask` are, all queued before the worker starts,
as when they come faster than it answers) with the worker's fair batches; and the same flood
with batches taken first come, first served (the old behaviour).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import collecting as collecting_module  # noqa: E402
from core import jobs as jobs_module  # noqa: E402
from core.conversation import ConversationKey  # noqa: E402
from core.generation.model_files import prepare_model  # noqa: E402
from core.generation.transformers_engine import TransformersEngine  # noqa: E402
from core.inbound import Outcome, submit_user_message  # noqa: E402
from core.jobs import JobQueue  # noqa: E402
from core.keys import Keys  # noqa: E402
from core.redis_conn import connect  # noqa: E402
from core.redis_server import RedisServer  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import ConversationStore  # noqa: E402
from core.worker import Worker  # noqa: E402


def small_engine(cache_dir: Path) -> TransformersEngine:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _source, location = prepare_model("", cache_dir, print)
    tokenizer = AutoTokenizer.from_pretrained(location)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    return TransformersEngine(model, tokenizer, context_tokens=512, max_batch_size=8)


def first_come_first_served(jobs: list[Any], size: int) -> tuple[list[Any], list[Any]]:
    ordered = sorted(jobs, key=lambda j: j.entry_id_order)
    return ordered[:size], ordered[size:]


async def one_case(engine: TransformersEngine, flood: int, fair: bool) -> float:
    """Seconds from the other user's message to its reply in the outbox."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        url = await asyncio.to_thread(server.start)
        redis = connect(url)
        settings = Settings.from_mapping(
            {
                "REDIS_URL": url,
                "CHATBOT_MAX_NEW_TOKENS": "24",
                "CHATBOT_CONTEXT_TOKENS": "512",
                "CHATBOT_MAX_BATCH_SIZE": "8",
                "CHATBOT_BATCH_WAIT_MS": "1",
                "CHATBOT_USER_RATE": "10000/min",
            }
        )
        keys = Keys(settings.namespace)
        store, queue = ConversationStore.from_settings(redis, settings), JobQueue(redis, keys)
        await queue.ensure_group()
        chosen = jobs_module.fair_share if fair else first_come_first_served
        collecting_module.fair_share = chosen  # type: ignore[assignment]
        worker = Worker(redis, settings, engine)
        # The flood is waiting when the other user writes (it came faster than the worker
        # answers): with this small model the worker would otherwise keep up with it.
        for i in range(flood):
            await submit(store, queue, f"flood-{i}", "flooder", f"question number {i}?")
        await submit(store, queue, "other", "someone-else", "Where is my parcel?")
        started = time.perf_counter()
        task = asyncio.create_task(worker.run())
        try:
            other = ConversationKey("console", "bench", "other").id
            last = "0-0"
            while True:
                response: Any = await redis.xread({keys.outbox("console"): last}, block=1000)
                for _stream, entries in response or []:
                    last = entries[-1][0]
                    if any(fields["conversation"] == other for _, fields in entries):
                        return time.perf_counter() - started
        finally:
            worker.stop()
            await task
            collecting_module.fair_share = jobs_module.fair_share  # type: ignore[assignment]
            await redis.aclose()
            await asyncio.to_thread(server.stop)


async def submit(
    store: ConversationStore, queue: JobQueue, thread: str, author: str, text: str
) -> None:
    submission = await submit_user_message(
        store,
        queue,
        ConversationKey("console", "bench", thread),
        text=text,
        author_id=author,
        author_name=author,
        message_id=f"{thread}-m1",
        max_chars=4000,
    )
    if submission.outcome is not Outcome.QUEUED:
        raise RuntimeError(f"not queued: {submission}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "flood.json")
    args = parser.parse_args()
    engine = small_engine(Path.home() / ".cache" / "chatbot")
    cases = {"alone": (0, True), "flooded, fair": (args.flood, True)}
    cases["flooded, first come first served"] = (args.flood, False)
    results = {}
    for name, (flood, fair) in cases.items():
        runs = [await one_case(engine, flood, fair) for _ in range(args.repeats)]
        results[name] = {"median_s": round(statistics.median(runs), 3), "runs_s": runs}
        print(f"{name:36s} other user's reply after {statistics.median(runs):.2f} s (median)")
    engine.close()
    report = {"flood_messages": args.flood, "max_batch_size": 8, "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
