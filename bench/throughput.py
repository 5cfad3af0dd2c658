"""Generation throughput: the engine's dynamic batching against one-at-a-time `generate`.

For each concurrency N (default 1, 8 and 32) the same N customer-service conversations
(system persona + one question) are answered twice on the same model, device and dtype:

- baseline: a loop that tokenises each conversation and calls `model.generate` on it alone
  (batch 1, greedy, the engine's repetition penalty);
- engine: `TransformersEngine.generate_sync` with all N requests at once.

Every request generates exactly `--new-tokens` tokens, so both sides do the same work: the
baseline passes `min_new_tokens`, and the engine runs without stop tokens (see
`FixedLengthEngine`). The tokens actually generated are counted and reported.
Throughput is all new tokens of all requests divided by wall time, tokenisation included.

Optionally (on by default) the full worker path is timed too: a real redis-server, N user
messages in N conversations submitted as an adapter would, and `core.worker.Worker` against
the same engine until all N replies are in the outbox.

    .venv/bin/python bench/throughput.py                       # bundled model, this machine
    python3 bench/throughput.py --device cuda --dtype bfloat16 --random-weights \\
        --tokenizer-dir DIR --skip-worker                       # GPU box without the weights

Figures go to stdout as a table and, with machine details, to a JSON file
(default bench/results/throughput-<device>-<dtype>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout that was not `pip install`ed
    sys.path.insert(0, str(REPO_ROOT))

# Only modules that need nothing beyond torch and transformers are imported here: the worker
# path (redis) is imported when it runs, so `--skip-worker` works where redis is missing.
from core.generation.engine import ChatTurn, Generation, GenerationRequest  # noqa: E402
from core.generation.model_files import choose_device, choose_dtype, load_model, prepare_model  # noqa: E402
from core.generation.transformers_engine import REPETITION_PENALTY, TransformersEngine  # noqa: E402
from core.settings import DEFAULT_PERSONA, Settings  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
T = TypeVar("T")
cuda_backends: Any = torch.backends.cuda  # its cuDNN switches are untyped
WARMUP_TOKENS = 4

QUESTIONS: tuple[str, ...] = (
    "How do I reset my password?",
    "I forgot my password and the reset email never arrives. I checked my spam folder "
    "twice and waited an hour. What else can I do?",
    "Can I get a refund for my last order?",
    "I was charged twice for the same order this morning. Can you refund one of the charges, "
    "please?",
    "Where is my package? The tracking number hasn't updated in four days.",
    "How long does standard shipping take to Canada?",
    "Do you ship internationally, and if so, who pays the customs fees?",
    "How do I download an invoice for my purchase?",
    "My invoice shows the wrong company name and VAT number. Can you issue a corrected one? "
    "Our accounting department needs it before the end of the month.",
    "Please delete my account and all my personal data.",
    "How do I change the email address on my account?",
    "I can't log in: it says my account is locked after too many attempts.",
    "What is your return policy for items bought on sale?",
    "The item I received is damaged. The box was crushed and the screen is cracked. "
    "What should I do?",
    "Can I change the delivery address of an order I placed an hour ago?",
    "How do I cancel my subscription before the next billing date?",
    "Why was my credit card declined at checkout? It works everywhere else.",
    "Do you offer student discounts?",
    "I received the wrong size. Can I exchange it for a medium instead of returning it?",
    "How do I turn on two-factor authentication?",
    "My discount code SPRING20 says it has expired, but the email said it is valid until "
    "Sunday. Can you help?",
    "Is it possible to pay by bank transfer or PayPal?",
    "How can I update my billing address?",
    "I never received my order confirmation email.",
    "Can I speak to a human agent, please?",
    "What are your customer service hours?",
    "How do I return an item if I lost the original packaging?",
    "My order arrived with one item missing. The packing slip lists three items but there "
    "were only two in the box.",
    "Can I add an item to an order that has already shipped?",
    "How do I unsubscribe from your marketing emails?",
    "Where can I find my order history?",
    "I moved to a new country. Will my subscription and saved payment methods still work, "
    "or do I need to create a new account?",
)


# -- the engine under test ---------------------------------------------------------------


class FixedLengthEngine(TransformersEngine):
    """The project's engine, unchanged except that no token stops generation early.

    With `stop_ids` empty, `_generate_batch` passes `eos_token_id=[]` to `generate` and never
    cuts a reply, so every request runs to its `max_new_tokens`: the engine's equivalent of
    the baseline's `min_new_tokens`. Each `generate_sync` call is also recorded.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_tokens: int,
        max_batch_size: int,
        executor: Executor,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            context_tokens=context_tokens,
            max_batch_size=max_batch_size,
            executor=executor,
        )
        self.natural_stop_ids = self.stop_ids  # what the baseline passes as eos_token_id
        self.stop_ids = []
        self.calls: list[tuple[int, int, float]] = []  # (requests, new tokens, seconds)

    def generate_sync(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        started = time.perf_counter()
        generations = super().generate_sync(requests)
        seconds = time.perf_counter() - started
        self.calls.append((len(requests), sum(g.new_tokens for g in generations), seconds))
        failed = [g for g in generations if g.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} engine generation(s) failed: {failed[0].error}")
        return generations


# -- results -------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    new_tokens: int  # counted from the outputs, all requests together

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclass
class Measurement:
    runs: list[Run] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_per_s": round(self.tokens_per_s, 2),
            "runs": [
                {
                    "seconds": round(r.seconds, 3),
                    "new_tokens": r.new_tokens,
                    "tokens_per_s": round(r.tokens_per_s, 2),
                }
                for r in self.runs
            ],
        }


@dataclass
class ConcurrencyResult:
    concurrency: int
    prompt_tokens: list[int]
    expected_new_tokens: int  # concurrency x --new-tokens, per run
    baseline: Measurement
    engine: Measurement

    @property
    def speedup(self) -> float:
        return self.engine.tokens_per_s / self.baseline.tokens_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "prompt_tokens": {
                "min": min(self.prompt_tokens),
                "mean": round(statistics.fmean(self.prompt_tokens), 1),
                "max": max(self.prompt_tokens),
            },
            "expected_new_tokens_per_run": self.expected_new_tokens,
            "baseline": self.baseline.to_json(),
            "engine": self.engine.to_json(),
            "speedup": round(self.speedup, 2),
        }


@dataclass
class WorkerResult:
    conversations: int
    replies: int
    answers: int
    seconds: float  # first submit to last reply in the outbox
    engine_calls: list[dict[str, Any]]
    engine_new_tokens: int
    engine_seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["engine_seconds"] = round(self.engine_seconds, 3)
        data["replies_per_s"] = round(self.replies / self.seconds, 3)
        data["new_tokens_per_s"] = round(self.engine_new_tokens / self.seconds, 2)
        data["overhead_s"] = round(self.seconds - self.engine_seconds, 3)
        return data


# -- building blocks -----------------------------------------------------------------------


def conversation(question: str) -> list[ChatTurn]:
    return [{"role": "system", "content": DEFAULT_PERSONA}, {"role": "user", "content": question}]


def make_requests(count: int, new_tokens: int, tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"{tag}-{i}", conversation(QUESTIONS[i % len(QUESTIONS)]), new_tokens)
        for i in range(count)
    ]


def print_now(line: str) -> None:
    print(line, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(
    args: argparse.Namespace, progress: Callable[[str], None], torch_thread: Executor
) -> FixedLengthEngine:
    cache_dir = Settings.from_mapping(
        {k: v for k, v in os.environ.items() if k == "CHATBOT_CACHE_DIR"}
    ).cache_dir
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        device = choose_device(args.device)
        dtype = choose_dtype(args.dtype, device)
        location = args.tokenizer_dir or prepare_model(args.model, cache_dir, progress)[1]
        progress(f"Random weights with the config and tokenizer of {location}")
        config = AutoConfig.from_pretrained(location)
        torch.manual_seed(0)
        auto_model: Any = AutoModelForCausalLM  # from_config is untyped
        model = auto_model.from_config(config)
        model.to(device=device, dtype=dtype)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(location)
    else:
        model, tokenizer, device = load_model(
            args.model, args.device, args.dtype, cache_dir, progress
        )
    context_tokens = Settings().context_tokens
    return FixedLengthEngine(
        model, tokenizer, context_tokens=context_tokens, max_batch_size=32, executor=torch_thread
    )


def run_baseline(
    engine: FixedLengthEngine, requests: Sequence[GenerationRequest], new_tokens: int
) -> Run:
    """One `generate` per request, batch 1, as a server without batching would do."""
    model, device = engine.model, engine.device
    total = 0
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for request in requests:
            ids = engine.encode(request.turns)
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                repetition_penalty=REPETITION_PENALTY,
                pad_token_id=engine.pad_id,
                eos_token_id=engine.natural_stop_ids,
            )
            new_ids = output[0, len(ids) :].tolist()
            engine.tokenizer.decode(new_ids, skip_special_tokens=True)
            total += len(new_ids)
    synchronize(device)
    return Run(time.perf_counter() - started, total)


def run_engine(engine: FixedLengthEngine, requests: Sequence[GenerationRequest]) -> Run:
    synchronize(engine.device)
    started = time.perf_counter()
    generations = engine.generate_sync(requests)
    synchronize(engine.device)
    seconds = time.perf_counter() - started
    return Run(seconds, sum(g.new_tokens for g in generations))


def measure_concurrency(
    engine: FixedLengthEngine, concurrency: int, new_tokens: int, repeats: int
) -> ConcurrencyResult:
    requests = make_requests(concurrency, new_tokens, f"c{concurrency}")
    engine.max_batch_size = concurrency
    # Warm-up at this batch shape (allocator, kernel selection), then the timed runs.
    engine.generate_sync(make_requests(concurrency, WARMUP_TOKENS, f"warm{concurrency}"))
    baseline, batched = Measurement(), Measurement()
    for repeat in range(repeats):
        baseline.runs.append(run_baseline(engine, requests, new_tokens))
        batched.runs.append(run_engine(engine, requests))
        print(
            f"  N={concurrency:<3} run {repeat + 1}/{repeats}: "
            f"baseline {baseline.runs[-1].tokens_per_s:7.1f} tok/s "
            f"({baseline.runs[-1].new_tokens} tokens in {baseline.runs[-1].seconds:.2f} s), "
            f"engine {batched.runs[-1].tokens_per_s:7.1f} tok/s "
            f"({batched.runs[-1].new_tokens} tokens in {batched.runs[-1].seconds:.2f} s)",
            flush=True,
        )
    return ConcurrencyResult(
        concurrency=concurrency,
        prompt_tokens=[len(engine.encode(r.turns)) for r in requests],
        expected_new_tokens=concurrency * new_tokens,
        baseline=baseline,
        engine=batched,
    )


# -- the full worker path ------------------------------------------------------------------


async def _worker_path(
    engine: FixedLengthEngine, conversations: int, new_tokens: int, data_dir: Path, timeout_s: float
) -> WorkerResult:
    from core.conversation import ConversationKey
    from core.inbound import Outcome, submit_user_message
    from core.jobs import JobQueue
    from core.keys import Keys
    from core.redis_conn import connect
    from core.redis_server import RedisServer
    from core.store import ConversationStore
    from core.worker import Worker

    server = RedisServer(data_dir / "redis")
    url = await asyncio.to_thread(server.start)
    redis = connect(url)
    try:
        settings = Settings.from_mapping(
            {
                "REDIS_URL": url,
                "CHATBOT_NAMESPACE": "bench",
                "CHATBOT_DATA_DIR": str(data_dir),
                "CHATBOT_MAX_NEW_TOKENS": str(new_tokens),
            }
        )
        engine.max_batch_size = settings.max_batch_size
        keys = Keys(settings.namespace)
        store = ConversationStore(
            redis, keys, max_messages=settings.history_max_messages, ttl_s=settings.history_ttl_s
        )
        queue = JobQueue(redis, keys)
        await queue.ensure_group()
        worker = Worker(redis, settings, engine)
        worker_task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # the worker is now blocked reading the job stream
        engine.calls.clear()

        outbox = keys.outbox("console")
        started = time.perf_counter()
        submissions = await asyncio.gather(
            *(
                submit_user_message(
                    store,
                    queue,
                    ConversationKey("console", "bench", f"customer-{i}"),
                    text=QUESTIONS[i % len(QUESTIONS)],
                    author_id=f"customer-{i}",
                    author_name=f"Customer {i}",
                    message_id=f"message-{i}",
                    max_chars=settings.max_message_chars,
                )
                for i in range(conversations)
            )
        )
        if any(s.outcome is not Outcome.QUEUED for s in submissions):
            raise RuntimeError(f"not every message was queued: {submissions}")
        # Wait on the outbox with a blocking XREAD rather than by polling: on a 2-core machine
        # a polling loop takes CPU (and the GIL) from the generating thread.
        received, last_id = 0, "0-0"
        while received < conversations:
            if worker_task.done():
                worker_task.result()  # raises what stopped the worker
                raise RuntimeError("the worker stopped before answering every message")
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"not all {conversations} replies arrived in {timeout_s:.0f} s")
            response: Any = await redis.xread({outbox: last_id}, block=1000)
            for _stream, entries in response or []:
                received += len(entries)
                last_id = entries[-1][0]
        seconds = time.perf_counter() - started

        worker.stop()
        await worker_task
        replies: Any = await redis.xrange(outbox)
        return WorkerResult(
            conversations=conversations,
            replies=len(replies),
            answers=sum(1 for _, fields in replies if fields.get("kind") == "answer"),
            seconds=seconds,
            engine_calls=[
                {"requests": n, "new_tokens": t, "seconds": round(s, 3)} for n, t, s in engine.calls
            ],
            engine_new_tokens=sum(t for _, t, _ in engine.calls),
            engine_seconds=sum(s for _, _, s in engine.calls),
        )
    finally:
        await redis.aclose()
        await asyncio.to_thread(server.stop)


def measure_worker(engine: FixedLengthEngine, conversations: int, new_tokens: int) -> WorkerResult:
    async def run() -> WorkerResult:
        # The engine generates on its executor, the thread that ran all other torch work
        # (as `chatbot run` loads and generates on the engine's one thread).
        with tempfile.TemporaryDirectory(prefix="chatbot-bench-") as tmp:
            return await _worker_path(engine, conversations, new_tokens, Path(tmp), 900.0)

    return asyncio.run(run())


# -- reporting -----------------------------------------------------------------------------


def machine_info(engine: FixedLengthEngine) -> dict[str, Any]:
    import transformers

    device = engine.device
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_table(results: Sequence[ConcurrencyResult], new_tokens: int) -> None:
    print()
    print(
        f"{'concurrency':>11}  {'baseline tok/s':>14}  {'engine tok/s':>12}  {'speedup':>7}  "
        f"{'new tokens/run (baseline, engine, expected)':>44}"
    )
    for r in results:
        counts = (
            f"{r.baseline.runs[0].new_tokens}, {r.engine.runs[0].new_tokens}, "
            f"{r.expected_new_tokens}"
        )
        print(
            f"{r.concurrency:>11}  {r.baseline.tokens_per_s:>14.1f}  {r.engine.tokens_per_s:>12.1f}"
            f"  {r.speedup:>6.2f}x  {counts:>44}"
        )
    print(f"({new_tokens} new tokens per request; tokens/s counts all requests)")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    staging.replace(path)


def parse_concurrency(raw: str) -> list[int]:
    try:
        values = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a list like 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r}: give positive whole numbers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--new-tokens", type=int, default=64, help="per request (default 64)")
    parser.add_argument(
        "--concurrency", type=parse_concurrency, default=[1, 8, 32], help="default 1,8,32"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration")
    parser.add_argument("--model", default="", help="as CHATBOT_MODEL; default: the bundled one")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights with the model's config and tokenizer (no weights needed)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        default="",
        help="with --random-weights: a directory with config.json and the tokenizer files "
        "(default: the cached converted bundled model)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    parser.add_argument("--skip-worker", action="store_true", help="skip the worker path")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="disable PyTorch's cuDNN attention backend (CUDA): it builds a plan for each new "
        "batch/length shape, which costs ~2 ms per attention call while decoding",
    )
    parser.add_argument(
        "--worker-conversations", type=int, default=8, help="for the worker path (default 8)"
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1 or args.worker_conversations < 1:
        parser.error("--new-tokens, --repeats and --worker-conversations must be at least 1")
    if args.tokenizer_dir and not args.random_weights:
        parser.error("--tokenizer-dir goes with --random-weights")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_cudnn_attention:
        cuda_backends.enable_cudnn_sdp(False)
    # All torch work runs on this one thread. On a small CPU, torch ops from a second thread
    # start a second OpenMP thread team; with more OpenMP threads than cores, libgomp stops
    # spin-waiting between parallel regions, and generation ran 30-60% slower here.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch") as torch_thread:
        return run_benchmark(args, torch_thread)


def run_benchmark(args: argparse.Namespace, torch_thread: Executor) -> int:
    def on_torch_thread(call: Callable[..., T], *call_args: Any) -> T:
        return torch_thread.submit(call, *call_args).result()

    started = time.perf_counter()
    engine = on_torch_thread(load, args, print_now, torch_thread)
    info = machine_info(engine)
    print(
        f"Model loaded in {time.perf_counter() - started:.1f} s on {info['device_name']} "
        f"({info['device']}, {info['dtype']}, torch {info['torch']}, "
        f"{info['torch_threads']} threads)",
        flush=True,
    )

    # Warm-up: one plain generate and one small batch before anything is timed.
    on_torch_thread(run_baseline, engine, make_requests(1, WARMUP_TOKENS, "warm"), WARMUP_TOKENS)
    on_torch_thread(engine.generate_sync, make_requests(2, WARMUP_TOKENS, "warm"))

    results: list[ConcurrencyResult] = []
    for concurrency in args.concurrency:
        print(f"Concurrency {concurrency}:", flush=True)
        results.append(
            on_torch_thread(measure_concurrency, engine, concurrency, args.new_tokens, args.repeats)
        )
    print_table(results, args.new_tokens)

    worker: WorkerResult | None = None
    worker_error = ""
    if not args.skip_worker:
        print(f"\nWorker path: {args.worker_conversations} conversations via redis…", flush=True)
        try:
            worker = measure_worker(engine, args.worker_conversations, args.new_tokens)
        except Exception as exc:  # report what we have; the table above still stands
            worker_error = f"{type(exc).__name__}: {exc}"
            print(f"Worker path failed: {worker_error}", flush=True)
        else:
            print(
                f"{worker.replies} replies ({worker.answers} answers) in {worker.seconds:.2f} s: "
                f"{worker.replies / worker.seconds:.2f} replies/s, "
                f"{worker.engine_new_tokens / worker.seconds:.1f} new tokens/s end to end; "
                f"engine batches {[c[0] for c in engine.calls]} took {worker.engine_seconds:.2f} s"
            )

    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(
        f"Load average (1, 5, 15 min) at start {info['load_average_at_start']}, at end "
        f"{info['load_average_at_end']}: other busy processes would skew these figures"
    )
    worker_json = worker.to_json() if worker else {"error": worker_error} if worker_error else None
    suffix = "-no-cudnn-attention" if args.no_cudnn_attention else ""
    out = args.out or RESULTS_DIR / f"throughput-{engine.device.type}-{info['dtype']}{suffix}.json"
    write_json(
        out,
        {
            "benchmark": "bench/throughput.py",
            "machine": info,
            "settings": {
                "model": args.model or "bundled SmolLM2-135M-Instruct",
                "random_weights": args.random_weights,
                "cudnn_attention": cuda_backends.cudnn_sdp_enabled()
                if engine.device.type == "cuda"
                else None,
                "new_tokens_per_request": args.new_tokens,
                "repeats": args.repeats,
                "repetition_penalty": REPETITION_PENALTY,
                "decoding": "greedy",
                "fixed_length": "baseline: min_new_tokens; engine: no stop tokens",
                "baseline": "model.generate once per request, batch 1, tokenisation included",
                "engine": "TransformersEngine.generate_sync, all N requests at once",
            },
            "results": [r.to_json() for r in results],
            "worker": worker_json,
        },
    )
    print(f"\nWrote {out}")
    return 1 if worker_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
