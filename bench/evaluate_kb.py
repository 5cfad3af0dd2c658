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
  (these figures are `core.training.kb_eval`'s, which `chatbot eval --kb` reports too)
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
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.knowledge.answers import FRAMES  # noqa: E402
from core.knowledge.embeddings import Embedder, load_embedder  # noqa: E402
from core.knowledge.retrieval import Index  # noqa: E402
from core.knowledge.verify import Verifier  # noqa: E402
from core.training.kb_eval import (  # noqa: E402
    FIXED_REPLIES,
    answer_questions,
    contains_all,
    knowledge_texts,
    load_questions,
    score,
    share,
    unsupported,
)

RESULTS = REPO_ROOT / "bench" / "results" / "kb-eval.json"
SETS = {
    "tuning": (REPO_ROOT / "examples" / "kb", REPO_ROOT / "examples" / "eval.yaml"),
    "held-out": (
        REPO_ROOT / "examples" / "ledgerly" / "kb",
        REPO_ROOT / "examples" / "ledgerly" / "eval.yaml",
    ),
}


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


async def evaluate_set(
    name: str, kb_dir: Path, question_file: Path, args: argparse.Namespace, embedder: Embedder
) -> dict[str, Any]:
    questions = load_questions(question_file)
    env = {"CHATBOT_MODEL": args.model} if args.model else {}  # e.g. `chatbot train sft`'s
    answers = await answer_questions(
        kb_dir,
        questions,
        embedder,
        env=env,
        timeout_s=args.timeout_s,
        progress=lambda line: print(f"[{name}] {line}", file=sys.stderr),
    )
    asked = questions.in_scope + questions.out_of_scope
    baseline = await baseline_rows(answers.index, embedder, asked)
    texts = knowledge_texts(answers.index)
    return {
        "set": name,
        "knowledge_base": _shown(kb_dir),
        "questions": _shown(question_file),
        **score(questions, answers),
        # Scored in `run`, with the cosine threshold chosen on the tuning set.
        "baseline": (
            baseline,
            questions.in_scope,
            questions.out_of_scope,
            texts,
            Verifier(texts, FRAMES + FIXED_REPLIES),
        ),
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
