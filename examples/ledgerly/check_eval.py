"""Mechanical checks of the Ledgerly example: the knowledge base's shape and eval.yaml.

    .venv/bin/python examples/ledgerly/check_eval.py

Reads kb/ with the project's own splitter (core.knowledge.documents), so a "section" here
is exactly what the bot retrieves. Exits 1 if any check fails.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.knowledge.documents import read_documents  # noqa: E402

try:  # the sentence splitter answers are quoted with, where this checkout has one
    from core.knowledge.sentences import split_sentences
except ImportError:  # pragma: no cover
    split_sentences = None

KB = HERE / "kb"
EVAL = HERE / "eval.yaml"

# Words that would mean an out-of-scope question is (partly) answered after all.
OOS_PROBES = [
    "founder",
    "founded",
    "ceo",
    "hiring",
    "career",
    "job",
    "stock price",
    "nasdaq",
    "share price",
    "investor",
    "funding",
    "employees",
    "acquir",
    "headquarter",
    "nonprofit",
    "non-profit",
    "charity",
    "payroll",
    "salar",
    "write off",
    "deduct",
    "timer",
    "time tracking",
    "billable",
    "hourly",
    "sdi",
    "e-invoic",
    "italy",
    "inventory",
    "stock level",
    "etsy",
    "advance you",
    "financing",
    "factoring",
    "loan",
    "quote",
    "estimate",
    "weather",
    "recipe",
    "super bowl",
    "everest",
    "movie",
]

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def main() -> int:
    documents = list(read_documents(KB))
    md_docs = [d for d in documents if d.title != "FAQ"]
    faq_docs = [d for d in documents if d.title == "FAQ"]
    faq_passages = [p for d in faq_docs for p in d.passages]

    # -- knowledge base shape ---------------------------------------------------------------
    titles = [d.title for d in md_docs]
    for title, n in Counter(titles).items():
        if n > 1:
            fail(f"duplicate title {title!r}")
    for path in sorted(KB.glob("*.md")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        if not first.startswith("# "):
            fail(f"{path.name}: first line is not '# Title'")
    for doc in md_docs:
        sections = [p.section for p in doc.passages]
        if len(set(sections)) != len(sections):
            fail(f"{doc.title}: a section was split into several passages")
        if "" in sections:
            fail(f"{doc.title}: text outside any ## section")
        if not 3 <= len(sections) <= 6:
            fail(f"{doc.title}: {len(sections)} sections (want 3-6)")
        for p in doc.passages:
            words = len(p.text.split())
            sentences = len(re.findall(r"[.!?](?=\s|$)", p.text))
            paragraphs = p.text.count("\n\n") + 1
            if not 40 <= words <= 110:
                fail(f"{doc.title} / {p.section}: {words} words (want 40-110)")
            if not 2 <= sentences <= 6:
                fail(f"{doc.title} / {p.section}: {sentences} sentences (want 2-6)")
            if paragraphs != 1:
                fail(f"{doc.title} / {p.section}: {paragraphs} paragraphs (want 1)")
    raw_faq = yaml.safe_load((KB / "faq.yaml").read_text(encoding="utf-8"))
    for entry in raw_faq:
        if set(entry) != {"question", "answer"}:
            fail(f"FAQ entry with keys {sorted(entry)}")
    faq_questions = [p.title for p in faq_passages]
    if not 12 <= len(faq_questions) <= 15:
        fail(f"{len(faq_questions)} FAQ entries (want 12-15)")
    if set(titles) & set(faq_questions):
        fail("a document title equals a FAQ question")

    # text of each source, as a list of passages (a section, or one FAQ answer)
    passages_of: dict[str, list[str]] = {d.title: [p.text for p in d.passages] for d in md_docs}
    for p in faq_passages:
        passages_of[p.title] = [p.text]

    # -- eval.yaml --------------------------------------------------------------------------
    data: dict[str, Any] = yaml.safe_load(EVAL.read_text(encoding="utf-8"))
    in_scope, out_scope, follow = data["in_scope"], data["out_of_scope"], data["follow_ups"]
    checked = 0
    used_sources: Counter[str] = Counter()

    def check_answerable(entry: dict[str, Any], where: str, keys: set[str]) -> None:
        nonlocal checked
        if not set(entry) <= keys or not {"question", "expected", "source"} <= set(entry):
            fail(f"{where}: keys {sorted(entry)}")
            return
        source, expected = entry["source"], entry["expected"]
        used_sources[source] += 1
        if source not in passages_of:
            fail(f"{where}: source {source!r} is neither a title nor a FAQ question")
            return
        if not (isinstance(expected, list) and 1 <= len(expected) <= 2):
            fail(f"{where}: expected must be a list of 1-2 strings")
            return
        for fact in expected:
            if not 1 <= len(fact.split()) <= 6:
                fail(f"{where}: expected {fact!r} is not 1-6 words")
        one_section = any(
            all(norm(f) in norm(text) for f in expected) for text in passages_of[source]
        )
        if not one_section:
            missing = [
                f for f in expected if not any(norm(f) in norm(t) for t in passages_of[source])
            ]
            fail(
                f"{where}: expected {expected} not all in one section of {source!r} "
                f"(missing anywhere: {missing})"
            )
        if split_sentences is not None:
            for fact in expected:
                sentences = [s for t in passages_of[source] for s in split_sentences(t)]
                if not any(norm(fact) in norm(s) for s in sentences):
                    fail(f"{where}: expected {fact!r} spans a sentence boundary in {source!r}")
        checked += len(expected)

    for i, entry in enumerate(in_scope, 1):
        check_answerable(
            entry,
            f"in_scope[{i}] {entry.get('question')!r}",
            {"question", "expected", "source", "hard"},
        )
    for i, entry in enumerate(follow, 1):
        check_answerable(
            entry,
            f"follow_ups[{i}] {entry.get('question')!r}",
            {"history", "question", "expected", "source"},
        )
        history = entry.get("history")
        if not (isinstance(history, list) and history and all(isinstance(h, str) for h in history)):
            fail(f"follow_ups[{i}]: history must be a non-empty list of strings")

    kinds = Counter(e.get("kind") for e in out_scope)
    for i, entry in enumerate(out_scope, 1):
        if set(entry) != {"question", "kind"} or entry["kind"] not in {
            "company",
            "near",
            "unrelated",
        }:
            fail(f"out_of_scope[{i}]: {entry}")
    questions = [e["question"] for e in in_scope + out_scope + follow]
    for q, n in Counter(questions).items():
        if n > 1:
            fail(f"duplicate question {q!r}")

    all_text = norm(
        " ".join(t for texts in passages_of.values() for t in texts) + " " + " ".join(passages_of)
    )
    probe_hits = {w: len(re.findall(rf"\b{re.escape(w)}", all_text)) for w in OOS_PROBES}
    probe_hits = {w: n for w, n in probe_hits.items() if n}

    # -- report -----------------------------------------------------------------------------
    n_sections = sum(len(d.passages) for d in md_docs)
    print(
        f"knowledge base: {len(md_docs)} Markdown documents, {n_sections} sections, "
        f"{len(faq_questions)} FAQ entries"
    )
    words = [len(p.text.split()) for d in md_docs for p in d.passages]
    print(
        f"  section length: {min(words)}-{max(words)} words, "
        f"longest {max(len(p.text) for d in md_docs for p in d.passages)} characters"
    )
    print(
        f"eval: {len(in_scope)} in_scope ({sum(bool(e.get('hard')) for e in in_scope)} hard), "
        f"{len(out_scope)} out_of_scope {dict(kinds)}, {len(follow)} follow_ups"
    )
    print(
        f"  {checked} expected strings checked against their source section"
        + (", each within one sentence" if split_sentences is not None else "")
    )
    unused = [t for t in passages_of if t not in used_sources]
    print(
        f"  sources used: {len(used_sources)} of {len(passages_of)}; "
        f"Markdown pages without a question: {[t for t in titles if t in unused] or 'none'}"
    )
    print(f"  out-of-scope probe words found in the KB: {probe_hits or 'none'}")
    for message in failures:
        print("FAIL:", message)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
