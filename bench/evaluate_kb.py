"""Evaluate knowledge-base answers: retrieval, grounded answers, declining out-of-scope.

Runs an evaluation set (YAML: `in_scope` entries `{question, expected: [facts], source}`,
`out_of_scope` entries `{question}`) against a knowledge-base folder:

1. Retrieval, with the real embedding model: the share of in-scope questions whose top
   passage is from the expected source (top-1), is among the top 3, or contains every
   expected fact.
2. The threshold: for each weight of cosine vs. lexical overlap, the score threshold that
   best separates in-scope from out-of-scope questions (accuracy over both sets), so that
   `CHATBOT_KB_MIN_SCORE` is measured, not guessed.
3. End to end, with the real worker, the bundled SmolLM2 and a real redis-server: each
   question is a new conversation; an in-scope answer counts when it contains every
   expected fact (case-insensitive), an out-of-scope question when it is declined with the
   offer of a person.

    .venv/bin/python bench/evaluate_kb.py                  # examples/kb + examples/eval.yaml
    .venv/bin/python bench/evaluate_kb.py --kb DIR --questions FILE --min-score 0.45

Figures go to stdout and to a JSON file (default bench/results/kb-eval.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.conversation import ConversationKey  # noqa: E402
from core.inbound import submit_user_message  # noqa: E402
from core.jobs import JobQueue  # noqa: E402
from core.keys import Keys  # noqa: E402
from core.knowledge import retrieval  # noqa: E402
from core.knowledge.embeddings import load_embedder  # noqa: E402
from core.knowledge.retrieval import Retriever, content_words  # noqa: E402
from core.knowledge.store import KnowledgeBaseStore  # noqa: E402
from core.redis_conn import Redis, connect  # noqa: E402
from core.redis_server import RedisServer  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import ConversationStore  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "kb-eval.json"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def load_questions(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return list(data["in_scope"]), list(data["out_of_scope"])


def contains_all(text: str, facts: Sequence[str]) -> bool:
    low = " ".join(text.lower().split())
    return all(" ".join(f.lower().split()) in low for f in facts)


async def retrieval_figures(
    retriever: Retriever, kb: str, in_scope: list[dict[str, Any]], out_scope: list[dict[str, Any]]
) -> dict[str, Any]:
    index = await retriever._index(kb)
    questions = [q["question"] for q in in_scope + out_scope]
    vectors = await retriever.embedder.embed(questions)
    candidates = [
        retrieval.rank(index, v, content_words(q), top_k=12)
        for q, v in zip(questions, vectors, strict=True)
    ]
    per_weight = []
    for weight in WEIGHTS:
        ranked = [
            sorted(c, key=lambda h: weight * h.cosine + (1 - weight) * h.overlap, reverse=True)
            for c in candidates
        ]
        best = [weight * r[0].cosine + (1 - weight) * r[0].overlap for r in ranked]
        inside, outside = best[: len(in_scope)], best[len(in_scope) :]
        top1 = sum(
            r[0].passage.title == q["source"] for r, q in zip(ranked, in_scope, strict=False)
        )
        top3 = sum(
            any(h.passage.title == q["source"] for h in r[:3])
            for r, q in zip(ranked, in_scope, strict=False)
        )
        fact1 = sum(
            contains_all(r[0].passage.text, q["expected"])
            for r, q in zip(ranked, in_scope, strict=False)
        )
        threshold, accuracy = best_threshold(inside, outside)
        per_weight.append(
            {
                "cosine_weight": weight,
                "top1_source": top1 / len(in_scope),
                "top3_source": top3 / len(in_scope),
                "top1_has_fact": fact1 / len(in_scope),
                "best_threshold": threshold,
                "separation_accuracy": accuracy,
                "in_scope_scores": summary(inside),
                "out_of_scope_scores": summary(outside),
            }
        )
    return {"per_weight": per_weight}


def best_threshold(inside: list[float], outside: list[float]) -> tuple[float, float]:
    """The threshold with the best balanced accuracy (the mean of the share of in-scope
    questions answered, score >= t, and of out-of-scope questions declined, score < t), so
    that the proportions of the evaluation set do not pick it; ties go to the middle of the
    best range, which generalises better than its edge."""
    points = sorted(set(inside + outside))
    cuts = [(a + b) / 2 for a, b in itertools.pairwise(points)] or points

    def balanced(t: float) -> float:
        answered = sum(s >= t for s in inside) / len(inside)
        declined = sum(s < t for s in outside) / len(outside)
        return (answered + declined) / 2

    scored = [(balanced(t), t) for t in cuts]
    top = max(a for a, _ in scored)
    best = [t for a, t in scored if a == top]
    return round(best[len(best) // 2], 3), top


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 3),
        "median": round(ordered[len(ordered) // 2], 3),
        "max": round(ordered[-1], 3),
    }


async def end_to_end(
    redis: Redis,
    settings: Settings,
    retriever: Retriever,
    in_scope: list[dict[str, Any]],
    out_scope: list[dict[str, Any]],
    timeout_s: float,
) -> dict[str, Any]:
    from core.generation.transformers_engine import open_engine
    from core.worker import Worker

    engine = await open_engine(settings, lambda line: print(line, file=sys.stderr))
    retriever.embedder.executor = engine.executor
    keys = Keys(settings.namespace)
    store = ConversationStore.from_settings(redis, settings)
    queue = JobQueue(redis, keys)
    await queue.ensure_group()
    worker = Worker(redis, settings, engine, retriever=retriever)
    task = asyncio.create_task(worker.run())
    questions = in_scope + out_scope
    started = time.perf_counter()
    try:
        for i, q in enumerate(questions):
            await submit_user_message(
                store,
                queue,
                ConversationKey("console", "eval", f"q{i}"),
                text=q["question"],
                author_id=f"customer-{i}",
                author_name="Customer",
                message_id=f"m{i}",
                max_chars=settings.max_message_chars,
            )
        replies: dict[str, dict[str, str]] = {}
        outbox = keys.outbox("console")
        while len(replies) < len(questions):
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"{len(replies)} of {len(questions)} replies in {timeout_s} s")
            if task.done():
                task.result()
            entries: Any = await redis.xrange(outbox)
            replies = {f["conversation"]: f for _, f in entries}
            await asyncio.sleep(0.5)
        seconds = time.perf_counter() - started
    finally:
        worker.stop()
        await task
        engine.close()
    rows = []
    for i, q in enumerate(questions):
        reply = replies[ConversationKey("console", "eval", f"q{i}").id]
        scope = "in" if i < len(in_scope) else "out"
        ok = (
            reply["kind"] == "answer" and contains_all(reply["text"], q["expected"])
            if scope == "in"
            else reply["kind"] == "decline"
        )
        rows.append(
            {
                "scope": scope,
                "question": q["question"],
                "kind": reply["kind"],
                "ok": ok,
                "reply": reply["text"],
            }
        )
    inside = [r for r in rows if r["scope"] == "in"]
    outside = [r for r in rows if r["scope"] == "out"]
    return {
        "answers_with_expected_fact": sum(r["ok"] for r in inside) / len(inside),
        "in_scope_declined": sum(r["kind"] == "decline" for r in inside) / len(inside),
        "out_of_scope_declined": sum(r["ok"] for r in outside) / len(outside),
        "seconds": round(seconds, 1),
        "rows": rows,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    in_scope, out_scope = load_questions(args.questions)
    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        url = await asyncio.to_thread(server.start)
        redis = connect(url)
        try:
            env = {"REDIS_URL": url, "CHATBOT_NAMESPACE": "eval", "CHATBOT_DATA_DIR": tmp}
            if args.min_score is not None:
                env["CHATBOT_KB_MIN_SCORE"] = str(args.min_score)
            settings = Settings.from_mapping(env)
            embedder = await asyncio.to_thread(load_embedder)
            kb_store = KnowledgeBaseStore(redis, Keys(settings.namespace))
            report = await kb_store.ingest(settings.kb, args.kb, embedder)
            print(f"ingested {args.kb}: {report.summary()}", file=sys.stderr)
            retriever = Retriever(kb_store, embedder)
            figures: dict[str, Any] = {
                "knowledge_base": str(args.kb),
                "questions": str(args.questions),
                "in_scope": len(in_scope),
                "out_of_scope": len(out_scope),
                "cosine_weight_in_product": retrieval.COSINE_WEIGHT,
                "min_score_in_product": settings.kb_min_score,
                "retrieval": await retrieval_figures(retriever, settings.kb, in_scope, out_scope),
                "date": datetime.date.today().isoformat(),
            }
            if not args.skip_answers:
                figures["answers"] = await end_to_end(
                    redis, settings, retriever, in_scope, out_scope, args.timeout_s
                )
        finally:
            await redis.aclose()
            await asyncio.to_thread(server.stop)
    return figures


def print_report(figures: dict[str, Any]) -> None:
    print(f"{figures['in_scope']} in-scope and {figures['out_of_scope']} out-of-scope questions")
    print(
        "\ncosine weight | top-1 source | top-3 source | top-1 has fact | threshold | balanced acc."
    )
    for row in figures["retrieval"]["per_weight"]:
        print(
            f"{row['cosine_weight']:>13} | {row['top1_source']:>12.1%} | "
            f"{row['top3_source']:>12.1%} | {row['top1_has_fact']:>14.1%} | "
            f"{row['best_threshold']:>9} | {row['separation_accuracy']:.1%}"
        )
    print(
        f"\nproduct: cosine weight {figures['cosine_weight_in_product']}, "
        f"CHATBOT_KB_MIN_SCORE {figures['min_score_in_product']}"
    )
    answers = figures.get("answers")
    if answers:
        print(f"answers containing the expected fact: {answers['answers_with_expected_fact']:.1%}")
        print(f"in-scope questions declined:          {answers['in_scope_declined']:.1%}")
        print(f"out-of-scope questions declined:      {answers['out_of_scope_declined']:.1%}")
        print(f"end to end: {answers['seconds']} s for all questions")
        for row in answers["rows"]:
            if not row["ok"]:
                print(f"  miss ({row['scope']}, {row['kind']}): {row['question']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", type=Path, default=REPO_ROOT / "examples" / "kb")
    parser.add_argument("--questions", type=Path, default=REPO_ROOT / "examples" / "eval.yaml")
    parser.add_argument("--min-score", type=float, help="override CHATBOT_KB_MIN_SCORE")
    parser.add_argument("--skip-answers", action="store_true", help="retrieval figures only")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    print_report(figures)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
