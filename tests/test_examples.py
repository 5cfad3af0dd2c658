"""The example knowledge bases and their question sets are consistent: what the knowledge
evaluation (`bench/evaluate_kb.py`) measures against is really in the documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from core.knowledge.documents import read_documents

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETS = {
    "tuning": (EXAMPLES / "kb", EXAMPLES / "eval.yaml"),
    "held-out": (EXAMPLES / "ledgerly" / "kb", EXAMPLES / "ledgerly" / "eval.yaml"),
}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_expected_fact_is_in_one_passage_of_its_source(name: str) -> None:
    kb, questions = SETS[name]
    passages: dict[str, list[str]] = {}
    for document in read_documents(kb):
        for passage in document.passages:
            passages.setdefault(passage.title, []).append(normalise(passage.text))
    data: dict[str, Any] = yaml.safe_load(questions.read_text(encoding="utf-8"))
    answerable = list(data["in_scope"]) + list(data.get("follow_ups") or [])
    assert len(data["in_scope"]) >= 40 and len(data["out_of_scope"]) >= 20
    for entry in answerable:
        assert entry["source"] in passages, entry
        facts = [normalise(f) for f in entry["expected"]]
        assert any(all(f in text for f in facts) for text in passages[entry["source"]]), entry
    kinds = {entry.get("kind") for entry in data["out_of_scope"]}
    assert kinds == {"company", "near", "unrelated"}, kinds
    questions_seen = [normalise(e["question"]) for e in data["in_scope"] + data["out_of_scope"]]
    assert len(questions_seen) == len(set(questions_seen))
