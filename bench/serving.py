"""A serving benchmark with vLLM's definitions, through the real worker and Redis.

Each request is a customer message submitted the way an adapter does (`submit_user_message`:
stored, deduplicated, queued), in a conversation of its own, answered by a real `Worker` with
the bundled model (a persona of its own, so the model writes the reply). Times come from
Redis stream entry ids (the server's clock, milliseconds), read after the run:

- TTFT: from the adapter's receipt (submission) to the first text a user could see: the
  reply's stream opening on the outbox (it goes with the first text, in one round trip; the
  reply's stream itself keeps only its last ~20 entries, so a long reply's first ones are
  gone from it by the end), or the complete reply when nothing streamed;
- E2EL: to the complete reply on the outbox;
- TPOT: (E2EL - TTFT) / (reply tokens - 1), per request; ITL: the gaps between a reply's
  stream entries (the worker publishes at most every 0.2 s, so ITL is that coarse);
- throughput: requests/s and reply tokens/s over the whole run.

Modes, on the same questions with mixed reply lengths (per-request `max_new_tokens` cycled
from LENGTHS, so that replies differ in length as real ones do):

- sequential: one `generate` call per request, one at a time (the seed documents' way);
- padded: requests that arrive while a batch runs wait for it, then go as one left-padded
  `generate` (the engine before continuous batching); nothing streams;
- continuous: the product's engine (continuous batching) with streaming on.

Loads: bursts of 1, 8 and 32 concurrent requests, Poisson arrivals at given rates, and
closed loops of 1, 8 and 32 users (vLLM's --max-concurrency: each user sends its next
request when its reply is complete, so the batch stays full instead of waiting for a
burst's longest reply; one at a time is measured once, with one user).
`--overhead` measures the pipeline alone with an instant engine: messages/s, the latency
the pipeline adds per message, and the CPU time each part spends per message (this
process, the worker's process, redis-server), which is steadier than wall time on a
machine whose speed drifts.

    .venv/bin/python bench/serving.py                          # the table in the note
    .venv/bin/python bench/serving.py --modes continuous --burst 8
    .venv/bin/python bench/serving.py --overhead 2000

Figures go to stdout and bench/results/serving-<device>.json; a plot to serving-<device>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


from bench.batching import LENGTHS, QUESTIONS  # noqa: E402  (the same mixed workload)
from core.conversation import ConversationKey  # noqa: E402
from core.generation.engine import Generation, GenerationRequest, TextListener  # noqa: E402
from core.generation.model_files import cpu_supports_bf16  # noqa: E402
from core.generation.transformers_engine import TransformersEngine, open_engine  # noqa: E402
from core.inbound import submit_user_message  # noqa: E402
from core.jobs import JobQueue  # noqa: E402
from core.keys import Keys  # noqa: E402
from core.redis_conn import connect  # noqa: E402
from core.redis_server import RedisServer  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.start_up_memory import frozen_start_up  # noqa: E402
from core.store import ConversationStore  # noqa: E402
from core.streaming import STREAM_KIND  # noqa: E402
from core.worker import Worker  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
PERSONA = "You are a friendly customer-service assistant of an outdoor shop. Reply helpfully."


class Budgeted:
    """The engine, with each request's reply budget taken from LENGTHS (by question)."""

    def __init__(self, inner: Any, budgets: dict[str, int]) -> None:
        self.inner = inner
        self.budgets = budgets

    @property
    def context_tokens(self) -> int:
        return int(self.inner.context_tokens)

    def count_tokens(self, turns: Any) -> int:
        return int(self.inner.count_tokens(turns))

    def truncate(self, text: str, max_tokens: int) -> str:
        return str(self.inner.truncate(text, max_tokens))

    def _budget(self, request: GenerationRequest) -> GenerationRequest:
        tokens = self.budgets.get(request.turns[-1]["content"], request.max_new_tokens)
        return GenerationRequest(request.request_id, request.turns, tokens)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await self.inner.generate([self._budget(r) for r in requests]))

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        result: Generation = await self.inner.stream(self._budget(request), on_text)
        return result

    def close(self) -> None:
        pass


class ThroughStream(Budgeted):
    """A mode whose scheduling is in `stream`: the worker calls `generate` when streaming is
    off (these modes never stream), and that must not bypass it for the product's engine."""

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self.stream(r, lambda _t: None) for r in requests)))


class Sequential(ThroughStream):
    """One request at a time, each alone in a `generate` call."""

    def __init__(self, inner: Any, budgets: dict[str, int]) -> None:
        super().__init__(inner, budgets)
        self.lock = asyncio.Lock()

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        async with self.lock:
            [result] = await self.inner.generate_padded([self._budget(request)])
            return result  # type: ignore[no-any-return]


class Padded(ThroughStream):
    """Requests that arrive while a padded batch runs wait for it and go together next."""

    def __init__(self, inner: Any, budgets: dict[str, int], max_batch: int) -> None:
        super().__init__(inner, budgets)
        self.max_batch = max_batch
        self.waiting: list[tuple[GenerationRequest, asyncio.Future[Generation]]] = []
        self.runner: asyncio.Task[None] | None = None

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self.waiting.append((self._budget(request), future))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self.waiting:
            await asyncio.sleep(0.03)  # the worker's batch wait: a burst joins one batch
            batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            results = await self.inner.generate_padded([r for r, _ in batch])
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


class Instant(Budgeted):
    """No model: a fixed reply at once (the pipeline's own cost)."""

    @property
    def context_tokens(self) -> int:
        return 2048

    def count_tokens(self, turns: Any) -> int:
        return sum(len(turn["content"]) // 4 + 4 for turn in turns)

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[: max_tokens * 4]

    async def stream(self, request: GenerationRequest, on_text: TextListener) -> Generation:
        text = "Thanks for your message, we are on it."
        on_text(text)
        return Generation(request.request_id, text, "stop", new_tokens=9)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [await self.stream(r, lambda _t: None) for r in requests]


def _instant_worker(
    mapping: dict[str, str], consumer: str, stop: Any, ready: Any, cpu_s: Any
) -> None:
    """A worker process with the instant engine, until `stop` is set; `cpu_s` gets the CPU
    seconds it used from `ready` to `stop` (its start-up left out)."""

    async def main() -> None:
        settings = Settings.from_mapping(mapping)
        redis = connect(mapping["REDIS_URL"])
        worker = Worker(redis, settings, Instant(None, {}), consumer=consumer)
        with frozen_start_up():  # as `chatbot worker` serves (bot/serve.py)
            task = asyncio.create_task(worker.run())
            await redis.ping()
            started = time.process_time()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            cpu_s.value = time.process_time() - started
            worker.stop()
            await task
        await redis.aclose()

    asyncio.run(main())


async def _redis_cpu_s(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _ms(entry_id: str) -> float:
    return int(str(entry_id).split("-")[0]) / 1000


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "mean": round(statistics.fmean(ordered), 4),
        "p50": round(at(0.5), 4),
        "p90": round(at(0.9), 4),
        "p99": round(at(0.99), 4),
    }


async def run_load(
    redis_url: str,
    engine: Any,
    tokenizer: Any,
    *,
    mode: str,
    arrivals_s: list[float],
    streaming: bool,
    users: int = 0,
    max_batch: int,
    namespace: str,
    batch_wait_ms: int | None = None,
    worker_process: bool = False,
) -> dict[str, Any]:
    """Submit one request per arrival time, wait for every reply, return the metrics.
    `users` > 0: a closed loop instead (vLLM's --max-concurrency): that many users, each
    sending its next request when the reply to its last one is complete, until
    len(arrivals_s) requests were sent (the arrival times are not used).
    `worker_process`: the worker (with an instant engine) runs in a process of its own, as
    deployed, instead of sharing this one's event loop with the submissions."""
    mapping = {
        "REDIS_URL": redis_url,
        "CHATBOT_NAMESPACE": namespace,
        "CHATBOT_PERSONA": PERSONA,
        "CHATBOT_STREAMING": "on" if streaming else "off",
        "CHATBOT_MAX_BATCH_SIZE": str(max_batch),
        "CHATBOT_MAX_NEW_TOKENS": str(max(LENGTHS)),
        "CHATBOT_USER_RATE": "1000/s",
        "CHATBOT_LOG_LEVEL": "WARNING",
        **({} if batch_wait_ms is None else {"CHATBOT_BATCH_WAIT_MS": str(batch_wait_ms)}),
    }
    settings = Settings.from_mapping(mapping)
    redis = connect(redis_url)
    keys = Keys(namespace)
    store = ConversationStore.from_settings(redis, settings)
    queue = JobQueue(redis, keys)
    await queue.ensure_group()
    if worker_process:
        spawn = multiprocessing.get_context("spawn")
        stop, ready, worker_cpu_s = spawn.Event(), spawn.Event(), spawn.Value("d", 0.0)
        child = spawn.Process(
            target=_instant_worker, args=(mapping, f"bench-{mode}", stop, ready, worker_cpu_s)
        )
        child.start()
        if not await asyncio.to_thread(ready.wait, 120):  # its imports take a few seconds
            raise RuntimeError("the worker process did not start")
    else:
        worker_redis = connect(redis_url)
        worker = Worker(worker_redis, settings, engine, consumer=f"bench-{mode}")
        worker_task = asyncio.create_task(worker.run())
    submitted: dict[str, float] = {}
    started = time.time()
    cpu_started, redis_cpu_started = time.process_time(), await _redis_cpu_s(redis)
    adapters = asyncio.Semaphore(64)  # submissions in flight at once, as a few adapters

    async def submit(index: int, at_s: float) -> None:
        await asyncio.sleep(max(0.0, started + at_s - time.time()))
        conversation = ConversationKey("bench", "w", f"c{index}", "")
        async with adapters:
            submitted[conversation.id] = time.time()
            await _submit(conversation, index)

    async def _submit(conversation: ConversationKey, index: int) -> None:
        await submit_user_message(
            store,
            queue,
            conversation,
            text=QUESTIONS[index % len(QUESTIONS)],
            author_id=f"u{index}",
            author_name=f"user {index}",
            message_id=f"m{index}",
            max_chars=settings.max_message_chars,
        )

    outbox = keys.outbox("bench")
    deadline = time.time() + 1800
    finals: dict[str, tuple[float, str, str]] = {}
    # When each reply's stream opened: its opening goes to the outbox with the first text,
    # in one round trip; the reply's own stream keeps only its last ~20 entries, so a long
    # reply's first text may be gone from it by the time it is read.
    opened: dict[str, float] = {}
    replied: dict[str, asyncio.Event] = {}

    async def collect() -> None:
        cursor = "0"  # each outbox entry read once: re-reading the whole outbox at every
        # poll cost this process more than the pipeline it measures, once there were thousands
        while len(finals) < len(arrivals_s) and time.time() < deadline:
            entries: Any = await redis.xrange(outbox, min=f"({cursor}", count=1000)
            for entry_id, fields in entries:
                cursor = entry_id
                if fields.get("kind") == STREAM_KIND:
                    opened.setdefault(fields["conversation"], _ms(entry_id))
                else:
                    conversation_id = fields["conversation"]
                    finals.setdefault(
                        conversation_id, (_ms(entry_id), fields["text"], fields["reply_id"])
                    )
                    if conversation_id in replied:
                        replied[conversation_id].set()
            if len(entries) < 1000:
                await asyncio.sleep(0.05 if not users else 0.01)

    async def user(first: int) -> None:
        for index in range(first, len(arrivals_s), users):
            conversation = ConversationKey("bench", "w", f"c{index}", "")
            done = replied.setdefault(conversation.id, asyncio.Event())
            submitted[conversation.id] = time.time()
            await _submit(conversation, index)
            await asyncio.wait_for(done.wait(), max(1.0, deadline - time.time()))

    if users:  # the replies are read while users wait for them
        collector = asyncio.create_task(collect())
        await asyncio.gather(*(user(u) for u in range(users)))
        await collector
    else:  # read after every submission, as before closed loops (no reads in the way)
        await asyncio.gather(*(submit(i, at) for i, at in enumerate(arrivals_s)))
        await collect()
    finished = time.time()
    # CPU time, steadier than wall time on a machine whose speed drifts: this process
    # (the submissions as adapters make them, the bench's reads, and the worker unless it
    # has a process of its own), the worker's process, redis-server.
    here = "adapters and bench" if worker_process else "adapters, bench and worker"
    cpu_s = {
        here: time.process_time() - cpu_started,
        "redis-server": await _redis_cpu_s(redis) - redis_cpu_started,
    }
    if worker_process:
        stop.set()
        await asyncio.to_thread(child.join, 60)
        cpu_s["worker process"] = worker_cpu_s.value
    else:
        worker.stop()
        await worker_task
        await worker_redis.aclose()
    ttft, e2el, tpot, itl, tokens = [], [], [], [], 0
    per_request: list[dict[str, Any]] = []  # in the order the replies were completed
    for conversation_id, (done_s, text, reply_id) in finals.items():
        sent_s = submitted[conversation_id]
        conversation = ConversationKey.from_id(conversation_id)
        entries = await redis.xrange(keys.reply_stream(conversation, reply_id))
        shown = [_ms(e) for e, f in entries if "text" in f]
        first_s = opened.get(conversation_id, shown[0] if shown else done_s)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else 9
        tokens += count
        ttft.append(first_s - sent_s)
        e2el.append(done_s - sent_s)
        per_request.append(
            {
                "conversation": conversation_id,
                "ttft_s": round(first_s - sent_s, 3),
                "e2el_s": round(done_s - sent_s, 3),
                "tokens": count,
                "stream_entries": len(shown),
                "sent_at_s": round(sent_s - started, 3),
            }
        )
        if count > 1:
            tpot.append((done_s - first_s) / (count - 1))
        itl += [b - a for a, b in itertools.pairwise(shown)]
    await redis.aclose()
    wall_s = max(finished - started, 1e-9)
    return {
        "mode": mode,
        "requests": len(arrivals_s),
        "completed": len(finals),
        "wall_s": round(wall_s, 2),
        "request_throughput": round(len(finals) / wall_s, 3),
        "output_tokens": tokens,
        "output_throughput_tok_s": round(tokens / wall_s, 2),
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles(itl),
        "e2el_s": percentiles(e2el),
        "per_request": per_request,
        "cpu_us_per_request": {
            part: round(seconds / max(len(finals), 1) * 1e6) for part, seconds in cpu_s.items()
        },
    }


def poisson(rate: float, count: int, rng: random.Random) -> list[float]:
    at, times = 0.0, []
    for _ in range(count):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def make_engine(mode: str, engine: TransformersEngine, max_batch: int) -> Any:
    budgets = {q: LENGTHS[i % len(LENGTHS)] for i, q in enumerate(QUESTIONS)}
    if mode == "sequential":
        return Sequential(engine, budgets)
    if mode == "padded":
        return Padded(engine, budgets, max_batch)
    return Budgeted(engine, budgets)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    server = RedisServer(tmp / "redis", appendonly=False)
    url = server.start()
    results: dict[str, Any] = {"runs": []}
    try:
        if args.overhead:
            # Throughput: a burst of N at once. Added latency: messages at a light load
            # (Poisson, 20/s), the time from the adapter's receipt to the reply on the
            # outbox when nothing queues (and with the 30 ms pause for a burst to join a
            # batch that was the default before continuous batching).
            rng = random.Random(7)
            burst = [0.0] * args.overhead
            light = poisson(20.0, 200, rng)
            overhead_loads = [  # (load, arrivals, batch wait, worker in a process of its own)
                (f"burst {args.overhead}, one process", burst, None, False),
                (f"burst {args.overhead}, worker process", burst, None, True),
                ("poisson 20/s, one process", light, None, False),
                ("poisson 20/s, worker process", light, None, True),
                ("poisson 20/s, worker process, CHATBOT_BATCH_WAIT_MS=30", light, 30, True),
            ]
            for n, (load, arrivals, wait_ms, apart) in enumerate(overhead_loads):
                with frozen_start_up():  # as the adapters and the worker serve
                    run = await run_load(
                        url,
                        Instant(None, {}),
                        None,
                        mode="instant",
                        arrivals_s=arrivals,
                        streaming=True,
                        max_batch=64,
                        namespace=f"overhead{n}",
                        batch_wait_ms=wait_ms,
                        worker_process=apart,
                    )
                run["load"] = load
                run["pipeline_messages_per_s"] = run["request_throughput"]
                results["runs"].append(run)
                print(
                    f"{load:>56}: {run['request_throughput']:7.1f} messages/s, "
                    f"added latency p50 {run['e2el_s']['p50'] * 1000:6.1f} ms "
                    f"p99 {run['e2el_s']['p99'] * 1000:6.1f} ms; CPU µs per message "
                    f"{run['cpu_us_per_request']}",
                    flush=True,
                )
            return results
        settings = Settings.from_mapping(
            {"CHATBOT_DTYPE": args.dtype, "CHATBOT_MAX_BATCH_SIZE": str(args.max_batch)}
        )
        # On the engine's own thread, as the worker loads it (see bench/decode.py).
        engine = await open_engine(settings, lambda *_a: None)
        results["dtype"] = args.dtype
        loads: list[tuple[str, list[float], int]] = [
            (f"burst {n}", [0.0] * n, 0) for n in args.burst
        ]
        rng = random.Random(7)
        loads += [(f"poisson {r}/s", poisson(r, args.poisson_requests, rng), 0) for r in args.rates]
        # Closed loops: `n` users, each asking again once answered; 4 requests a user, and
        # at least 16 (the one-user loop is the one-at-a-time baseline of the others).
        loads += [(f"{n} users", [0.0] * max(16, 4 * n), n) for n in args.users]
        for load, arrivals, users in loads:
            for mode in args.modes:
                if users and mode == "sequential" and users > 1:
                    continue  # one at a time is one at a time: the 1-user loop measures it
                with frozen_start_up():  # the model loaded, as `chatbot worker` serves
                    run = await run_load(
                        url,
                        make_engine(mode, engine, args.max_batch),
                        engine.tokenizer,
                        mode=mode,
                        arrivals_s=arrivals,
                        users=users,
                        streaming=mode == "continuous",
                        max_batch=args.max_batch,
                        namespace=f"b{len(results['runs'])}",
                    )
                run["load"] = load
                results["runs"].append(run)
                print(
                    f"{load:>14} {mode:>10}: {run['output_throughput_tok_s']:7.1f} tok/s, "
                    f"TTFT p50 {run['ttft_s'].get('p50', 0):6.2f} s, "
                    f"E2EL p50 {run['e2el_s'].get('p50', 0):6.2f} s "
                    f"p99 {run['e2el_s'].get('p99', 0):6.2f} s",
                    flush=True,
                )
    finally:
        server.stop()
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for mode in ("sequential", "padded", "continuous"):
            runs = [r for r in results["runs"] if r["mode"] == mode and "load" in r]
            labels = [r["load"] for r in runs]
            left.plot(labels, [r["ttft_s"].get("p50", 0) for r in runs], marker="o", label=mode)
            right.plot(labels, [r["output_throughput_tok_s"] for r in runs], marker="o", label=mode)
        left.set_title("time to first words, p50 (s)")
        right.set_title("reply tokens / s")
        for axis in (left, right):
            axis.tick_params(axis="x", rotation=30)
            axis.legend()
        fig.tight_layout()
        fig.savefig(path)
        print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["sequential", "padded", "continuous"])
    parser.add_argument("--burst", nargs="*", type=int, default=[1, 8, 32])
    parser.add_argument("--rates", nargs="*", type=float, default=[0.5, 1.0])
    parser.add_argument("--poisson-requests", type=int, default=16)
    parser.add_argument(
        "--users", nargs="*", type=int, default=[1, 8, 32], help="closed loops of N users"
    )
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--overhead", type=int, default=0, help="instant engine, N messages")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_supports_bf16(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    device = "cpu"
    name = "serving-overhead" if args.overhead else f"serving-{device}-{args.dtype}"
    out = args.out or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    if not args.overhead:
        plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
