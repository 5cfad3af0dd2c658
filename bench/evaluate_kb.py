"""Evaluate knowledge-base answers end to end, on a tuning company and a held-out one.

Each set is a knowledge-base folder and a question file (YAML: `in_scope` entries
`{question, expected: [facts], source}`, `out_of_scope` entries `{question, kind}`,
optional `follow_ups` `{history: [question], question, expected, source}`). For each set,
with a real redis-server, the real worker and the bundled models, every question is a new
conversation (a follow-up is asked in the conversation of its first question), and the
figures are:

- facts: in-scope questions answered with every expected fact (case-insensitive);
- citation: in-scope questions answered citing the expected document (title or FAQ question);
- answered / declined: in-scope questions answered; out-of-scope questions declined;
- invented numbers: replies with a number, e-mail or link found nowhere in the knowledge base;
- unsupported sentences: sentences outside the fixed frames that no single passage supports
  (`core.knowledge.verify`);
- median words of an answer (without its source line);
- the extractive baseline, computed in the same run on the same questions: the top passage
  by cosine, quoted whole, declining below the cosine threshold that best separates the
  tuning set (the same protocol as the product's thresholds).

The product's weights and thresholds were chosen on the tuning set (examples/kb,
examples/eval.yaml) only; the held-out set (examples/ledgerly) is only ever reported on.

    .venv/bin/python bench/evaluate_kb.py            # both sets, figures to bench/results/
    .venv/bin/python bench/evaluate_kb.py --kb DIR --questions FILE --output FILE  # your own
    .venv/bin/python bench/evaluate_kb.py --model models/harbor-sft --output FILE  # a model

Figures go to stdout (a table) and to bench/results/kb-eval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import re
import statistics
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
from core.knowledge.answers import FRAMES  # noqa: E402
from core.knowledge.embeddings import Embedder, load_embedder  # noqa: E402
from core.knowledge.retrieval import Index, Retriever  # noqa: E402
from core.knowledge.sentences import split_sentences  # noqa: E402
from core.knowledge.store import KnowledgeBaseStore  # noqa: E402
from core.knowledge.verify import Verifier, invented_facts  # noqa: E402
from core.redis_conn import Redis, connect  # noqa: E402
from core.redis_server import RedisServer  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import ConversationStore  # noqa: E402
from core.support.forget import FORGET_CONFIRM_TEXT, FORGET_DONE  # noqa: E402
from core.support.handoff import HANDOFF_NO_CONTACT, HANDOFF_STARTED  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "kb-eval.json"
SETS = {
    "tuning": (REPO_ROOT / "examples" / "kb", REPO_ROOT / "examples" / "eval.yaml"),
    "held-out": (
        REPO_ROOT / "examples" / "ledgerly" / "kb",
        REPO_ROOT / "examples" / "ledgerly" / "eval.yaml",
    ),
}
# The product's other fixed, fact-free replies (a customer who asks for a person is told so).
FIXED_REPLIES = (HANDOFF_STARTED, HANDOFF_NO_CONTACT, FORGET_CONFIRM_TEXT, FORGET_DONE)
_SOURCE_LINE = re.compile(r"^Sources?: (.*)$", re.MULTILINE)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def contains_all(text: str, facts: Sequence[str]) -> bool:
    low = normalise(text)
    return all(normalise(f) in low for f in facts)


def body_of(reply: str) -> str:
    """A reply without its source line and quote markers: what the facts are looked for in."""
    lines = [line.removeprefix(">").strip() for line in reply.splitlines()]
    return "\n".join(line for line in lines if not _SOURCE_LINE.match(line))


def cites(reply: str, source: str) -> bool:
    cited = _SOURCE_LINE.search(reply)
    if not cited:
        return False
    labels = [label.strip() for label in cited.group(1).split(";")]
    return any(label == source or label.startswith(f"{source} ›") for label in labels)


def unsupported(reply: str, verifier: Verifier) -> list[str]:
    reasons = []
    for paragraph in body_of(reply).split("\n"):
        for sentence in split_sentences(paragraph.replace(" … ", "\n")):
            verdict = verifier.check(sentence)
            if not verdict.supported:
                reasons.append(verdict.reason)
    return reasons


def best_cosine_threshold(inside: list[float], outside: list[float]) -> float:
    """The cut with the best balanced accuracy; ties go to the middle of the best range."""
    points = sorted(set(inside + outside))
    cuts = [(a + b) / 2 for a, b in itertools.pairwise(points)] or points

    def balanced(t: float) -> float:
        return (
            sum(s >= t for s in inside) / len(inside) + sum(s < t for s in outside) / len(outside)
        ) / 2

    scored = [(balanced(t), t) for t in cuts]
    top = max(a for a, _ in scored)
    best = [t for a, t in scored if a == top]
    return best[len(best) // 2]


async def baseline_rows(
    index: Index, embedder: Embedder, questions: list[dict[str, Any]]
) -> list[tuple[float, str, str]]:
    """(cosine, quoted passage, cited title) of the top passage by cosine, per question."""
    vectors = await embedder.embed([q["question"] for q in questions])
    rows = []
    for vector in vectors:
        cosines = index.vectors @ vector
        best = int(cosines.argmax())
        passage = index.passages[best]
        rows.append((float(cosines[best]), passage.text, passage.title))
    return rows


async def ask_all(
    redis: Redis,
    settings: Settings,
    questions: list[tuple[str, str]],
    expect: dict[str, int],
    timeout_s: float,
    started: float,
    worker_task: asyncio.Task[None],
) -> dict[str, list[dict[str, str]]]:
    """Submit (conversation, text) pairs; wait until each conversation has `expect` replies."""
    keys = Keys(settings.namespace)
    store = ConversationStore.from_settings(redis, settings)
    queue = JobQueue(redis, keys)
    for n, (conversation, text) in enumerate(questions):
        await submit_user_message(
            store,
            queue,
            ConversationKey("console", "eval", conversation),
            text=text,
            author_id=f"customer-{conversation}",
            author_name="Customer",
            message_id=f"m{n}-{time.monotonic_ns()}",
            max_chars=settings.max_message_chars,
        )
    while True:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"no replies to every question in {timeout_s} s")
        if worker_task.done():
            worker_task.result()
        entries: Any = await redis.xrange(keys.outbox("console"))
        replies: dict[str, list[dict[str, str]]] = {}
        for _, fields in entries:
            channel = ConversationKey.from_id(fields["conversation"]).channel
            replies.setdefault(channel, []).append(fields)
        if all(len(replies.get(c, [])) >= n for c, n in expect.items()):
            return replies
        await asyncio.sleep(0.3)


async def evaluate_set(
    name: str, kb_dir: Path, question_file: Path, args: argparse.Namespace, embedder: Embedder
) -> dict[str, Any]:
    from core.generation.transformers_engine import open_engine
    from core.worker import Worker

    data = yaml.safe_load(question_file.read_text(encoding="utf-8"))
    in_scope, out_scope = list(data["in_scope"]), list(data["out_of_scope"])
    follow_ups = list(data.get("follow_ups") or [])
    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        url = await asyncio.to_thread(server.start)
        redis = connect(url)
        try:
            env = {"REDIS_URL": url, "CHATBOT_NAMESPACE": "eval", "CHATBOT_DATA_DIR": tmp}
            if args.model:  # e.g. a fine-tuned model (`chatbot train sft`)
                env["CHATBOT_MODEL"] = args.model
            settings = Settings.from_mapping(env)
            kb_store = KnowledgeBaseStore(redis, Keys(settings.namespace))
            report = await kb_store.ingest(settings.kb, kb_dir, embedder)
            print(f"[{name}] ingested {kb_dir}: {report.summary()}", file=sys.stderr)
            retriever = Retriever(kb_store, embedder)
            index = await retriever.index(settings.kb)
            engine = await open_engine(settings, lambda line: print(line, file=sys.stderr))
            embedder.executor = engine.executor
            await JobQueue(redis, Keys(settings.namespace)).ensure_group()
            worker = Worker(redis, settings, engine, retriever=retriever)
            task = asyncio.create_task(worker.run())
            started = time.perf_counter()
            try:
                first = [(f"q{i}", q["question"]) for i, q in enumerate(in_scope + out_scope)]
                first += [(f"f{i}", f["history"][0]) for i, f in enumerate(follow_ups)]
                replies = await ask_all(
                    redis, settings, first, {c: 1 for c, _ in first}, args.timeout_s, started, task
                )
                if follow_ups:
                    second = [(f"f{i}", f["question"]) for i, f in enumerate(follow_ups)]
                    replies = await ask_all(
                        redis,
                        settings,
                        second,
                        {c: 2 for c, _ in second},
                        args.timeout_s,
                        started,
                        task,
                    )
                seconds = time.perf_counter() - started
            finally:
                worker.stop()
                await task
                engine.close()
                embedder.executor = None  # the engine's thread is gone
            baseline = await baseline_rows(index, embedder, in_scope + out_scope)
        finally:
            await redis.aclose()
            await asyncio.to_thread(server.stop)
    return score_set(
        name,
        kb_dir,
        question_file,
        index,
        in_scope,
        out_scope,
        follow_ups,
        replies,
        baseline,
        seconds,
    )


def score_set(
    name: str,
    kb_dir: Path,
    question_file: Path,
    index: Index,
    in_scope: list[dict[str, Any]],
    out_scope: list[dict[str, Any]],
    follow_ups: list[dict[str, Any]],
    replies: dict[str, list[dict[str, str]]],
    baseline: list[tuple[float, str, str]],
    seconds: float,
) -> dict[str, Any]:
    texts = [p.text for p in index.passages] + [p.title for p in index.passages]
    verifier = Verifier(texts, FRAMES + FIXED_REPLIES)
    rows = []
    for i, q in enumerate(in_scope + out_scope):
        reply = replies[f"q{i}"][0]
        scope = "in" if i < len(in_scope) else "out"
        rows.append(
            {
                "scope": scope,
                "kind_of_question": q.get("kind", ""),
                "question": q["question"],
                "kind": reply["kind"],
                "facts": scope == "in"
                and reply["kind"] == "answer"
                and contains_all(body_of(reply["text"]), q["expected"]),
                "cites": scope == "in"
                and reply["kind"] == "answer"
                and cites(reply["text"], q["source"]),
                "invented": invented_facts(body_of(reply["text"]), texts),
                "unsupported": unsupported(reply["text"], verifier),
                "words": len(body_of(reply["text"]).split()),
                "reply": reply["text"],
            }
        )
    inside = [r for r in rows if r["scope"] == "in"]
    outside = [r for r in rows if r["scope"] == "out"]
    answers = [r for r in rows if r["kind"] == "answer"]
    follow_rows = []
    for i, f in enumerate(follow_ups):
        reply = replies[f"f{i}"][-1]
        follow_rows.append(
            {
                "history": f["history"],
                "question": f["question"],
                "facts": reply["kind"] == "answer"
                and contains_all(body_of(reply["text"]), f["expected"]),
                "reply": reply["text"],
            }
        )
    return {
        "set": name,
        "knowledge_base": _shown(kb_dir),
        "questions": _shown(question_file),
        "in_scope": len(inside),
        "out_of_scope": len(outside),
        "product": {
            "facts": share(r["facts"] for r in inside),
            "citation": share(r["cites"] for r in inside),
            "answered": share(r["kind"] == "answer" for r in inside),
            "declined": share(r["kind"] == "decline" for r in outside),
            "declined_by_kind": {
                kind: share(
                    r["kind"] == "decline" for r in outside if r["kind_of_question"] == kind
                )
                for kind in sorted({r["kind_of_question"] for r in outside})
            },
            "invented_numbers": sum(bool(r["invented"]) for r in rows),
            "unsupported_sentences": sum(len(r["unsupported"]) for r in rows),
            "median_words": statistics.median(r["words"] for r in answers) if answers else 0,
            "follow_ups": share(r["facts"] for r in follow_rows) if follow_rows else None,
            "seconds": round(seconds, 1),
        },
        # Scored in `run`, with the cosine threshold chosen on the tuning set.
        "baseline": (baseline, in_scope, out_scope, texts, verifier),
        "rows": rows,
        "follow_up_rows": follow_rows,
    }


def baseline_figures(
    baseline: list[tuple[float, str, str]],
    in_scope: list[dict[str, Any]],
    out_scope: list[dict[str, Any]],
    texts: list[str],
    verifier: Verifier,
    threshold: float,
) -> dict[str, Any]:
    inside, outside = baseline[: len(in_scope)], baseline[len(in_scope) :]
    return {
        "cosine_threshold": round(threshold, 3),
        "facts": share(
            c >= threshold and contains_all(t, q["expected"])
            for (c, t, _), q in zip(inside, in_scope, strict=True)
        ),
        "citation": share(
            c >= threshold and s == q["source"]
            for (c, _, s), q in zip(inside, in_scope, strict=True)
        ),
        "answered": share(c >= threshold for c, _, _ in inside),
        "declined": share(c < threshold for c, _, _ in outside),
        "invented_numbers": 0,
        "unsupported_sentences": sum(
            len(unsupported(t, verifier)) for c, t, _ in baseline if c >= threshold
        ),
        "median_words": statistics.median(len(t.split()) for c, t, _ in baseline if c >= threshold),
    }


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def share(values: Any) -> float:
    items = list(values)
    return round(sum(bool(v) for v in items) / len(items), 3) if items else 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    embedder = await asyncio.to_thread(load_embedder)
    chosen = {name: SETS[name] for name in args.sets}
    if args.kb or args.questions:
        if not (args.kb and args.questions):
            raise SystemExit("--kb and --questions go together")
        chosen = {"custom": (args.kb.resolve(), args.questions.resolve())}
    results = [
        await evaluate_set(name, kb, questions, args, embedder)
        for name, (kb, questions) in chosen.items()
    ]
    # The baseline's one setting, its cosine threshold, is chosen like the product's: on the
    # tuning set (or on each set, when the tuning set is not part of the run).
    tuning = next((r for r in results if r["set"] == "tuning"), None)
    for result in results:
        baseline, in_scope, out_scope, texts, verifier = result["baseline"]
        source = (tuning or result)["baseline"]
        n = len(source[1])
        threshold = best_cosine_threshold(
            [b[0] for b in source[0][:n]], [b[0] for b in source[0][n:]]
        )
        result["baseline_threshold_from"] = "tuning" if tuning else result["set"]
        result["pending"] = baseline_figures(
            baseline, in_scope, out_scope, texts, verifier, threshold
        )
    for result in results:
        result["baseline"] = result.pop("pending")
    return {"date": datetime.date.today().isoformat(), "sets": results}


METRICS = (
    ("facts", "{:.1%}"),
    ("citation", "{:.1%}"),
    ("answered", "{:.1%}"),
    ("declined", "{:.1%}"),
    ("invented_numbers", "{}"),
    ("unsupported_sentences", "{}"),
    ("median_words", "{}"),
)


def print_report(figures: dict[str, Any]) -> None:
    for result in figures["sets"]:
        product, baseline = result["product"], result["baseline"]
        print(
            f"\n{result['set']}: {result['knowledge_base']}, {result['in_scope']} answerable and "
            f"{result['out_of_scope']} unanswerable questions"
        )
        print(f"{'':24} | {'product':>8} | {'baseline':>8}")
        for metric, form in METRICS:
            ours, theirs = form.format(product[metric]), form.format(baseline[metric])
            print(f"{metric:24} | {ours:>8} | {theirs:>8}")
        if product["follow_ups"] is not None:
            print(f"{'follow-ups (facts)':24} | {product['follow_ups']:>8.1%} |")
        print(f"declined by kind: {product['declined_by_kind']}; {product['seconds']} s")
        for row in result["rows"]:
            wrong = (row["scope"] == "in" and not row["facts"]) or (
                row["scope"] == "out" and row["kind"] != "decline"
            )
            if wrong:
                print(f"  miss ({row['scope']}, {row['kind']}): {row['question'][:90]}")
            for reason in row["unsupported"]:
                print(f"  unsupported: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--kb", type=Path, help="your own knowledge-base folder (with --questions)")
    parser.add_argument("--questions", type=Path, help="your own question file, same format")
    parser.add_argument("--model", default="", help="the model to serve (CHATBOT_MODEL syntax)")
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
