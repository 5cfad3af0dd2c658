"""`chatbot eval --kb DIR --questions FILE`: the knowledge-answer metrics in the CLI, on a
private redis-server with the real worker, retriever and embedder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.errors import DataError
from core.training.kb_eval import knowledge_regressions, load_questions
from tests.conftest import CACHE_DIR
from tests.helpers import tiny_llama
from tests.processes import REPO, chatbot, chatbot_env

QUESTIONS: dict[str, Any] = {
    "in_scope": [
        {
            "question": "how much is shipping to california?",
            "expected": ["$5.95"],
            "source": "Shipping Policy",
        },
        {
            "question": "Can you send stuff to Canada? How long would it take to get to Toronto?",
            "expected": ["$19.95", "7 to 14 business days"],
            "source": "Shipping Policy",
        },
        {
            "question": "whats the warranty on the camp stove",
            "expected": ["2-year limited warranty"],
            "source": "Warranty and Lifetime Guarantee",
        },
        # Answered, but the expected fact is one the knowledge base does not hold: the
        # `facts` share must count it as a miss (3 of 4), `answered` must not.
        {
            "question": "how much is shipping to oregon?",
            "expected": ["$999.99"],
            "source": "Shipping Policy",
        },
    ],
    "out_of_scope": [
        {
            "question": "hey can u help me write a cover letter for a barista job",
            "kind": "unrelated",
        },
        {"question": "how many cups are in a liter again", "kind": "unrelated"},
    ],
    "follow_ups": [
        {
            "history": ["how much is standard shipping to texas"],
            "question": "what about to hawaii",
            "expected": ["$12.95"],
            "source": "Shipping Policy",
        }
    ],
}


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_example_question_files_load() -> None:
    for path in (REPO / "examples" / "eval.yaml", REPO / "examples" / "ledgerly" / "eval.yaml"):
        questions = load_questions(path)
        assert questions.in_scope and questions.out_of_scope and questions.follow_ups


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("in_scope: [\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("in_scope: []\nout_of_scope: [{question: x}]\n", "`in_scope` must be a non-empty list"),
        (
            "in_scope: [{question: a, expected: [x], source: S}, {question: b, source: S}]\n"
            "out_of_scope: [{question: x}]\n",
            "in_scope entry 2: `expected` must be a list of texts",
        ),
        (
            "in_scope: [{question: a, expected: [x], source: S}]\nout_of_scope: [{kind: near}]\n",
            "out_of_scope entry 1: `question` must be non-empty text",
        ),
        (
            "in_scope: [{question: a, expected: [x], source: S}]\nout_of_scope: [{question: x}]\n"
            "follow_ups: [{history: a, question: b, expected: [x], source: S}]\n",
            "follow_ups entry 1: `history` must list questions",
        ),
    ],
)
def test_a_bad_question_file_names_the_file_the_entry_and_the_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "questions.yaml"
    path.write_text(content)
    with pytest.raises(DataError) as raised:
        load_questions(path)
    assert str(raised.value).startswith(f"{path}: ") and problem in str(raised.value)


def test_knowledge_regressions_beyond_the_tolerance() -> None:
    serving = {"facts": 0.9, "declined": 0.95, "invented_numbers": 0, "follow_ups": None}
    assert knowledge_regressions(dict(serving, facts=0.89), serving) == []
    worse = knowledge_regressions(dict(serving, facts=0.8, invented_numbers=1), serving)
    assert worse == ["knowledge facts 0.800 < 0.900", "knowledge invented_numbers 1 > 0"]


def test_kb_and_questions_go_together_and_are_checked_before_any_model_loads(
    tmp_path: Path,
) -> None:
    env = chatbot_env(CHATBOT_CACHE_DIR=str(CACHE_DIR))
    proc = chatbot(["eval", "--kb", str(REPO / "examples" / "kb")], env, tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--kb DIR and --questions FILE go together" in stderr
    bad = write_yaml(tmp_path / "q.yaml", {"in_scope": [{"question": "x"}], "out_of_scope": []})
    proc = chatbot(
        ["eval", "--kb", str(REPO / "examples" / "kb"), "--questions", str(bad)], env, tmp_path
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and f"{bad}: in_scope entry 1" in stderr
    assert "Traceback" not in stderr and "loaded on" not in stderr


@pytest.mark.slow
def test_eval_reports_the_knowledge_answer_metrics(model_dir: Path, tmp_path: Path) -> None:
    """End to end through the CLI with no Redis configured: the figures count what the
    worker replied (3 of 4 expected facts, both unanswerable questions declined)."""
    from transformers import AutoTokenizer

    from core.training.sft import save_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tiny = tmp_path / "tiny"
    save_model(tiny_llama(tokenizer, max_positions=1024), tokenizer, tiny)
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps({"dialogue": ["hi", "Hello! How can I help?"]}) + "\n")
    questions = write_yaml(tmp_path / "questions.yaml", QUESTIONS)
    out = tmp_path / "eval.json"
    env = chatbot_env(
        CHATBOT_CACHE_DIR=str(CACHE_DIR), CHATBOT_MAX_NEW_TOKENS="8", CHATBOT_DTYPE="float32"
    )
    args = ["eval", "--model", str(tiny), "--data", str(dialogues), "--json", str(out)]
    args += ["--kb", str(REPO / "examples" / "kb"), "--questions", str(questions)]
    proc = chatbot(args, env, tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    result = json.loads(out.read_text())
    assert {"model", "dialogues", "assistant_tokens", "perplexity", "bleu", "chrf"} <= set(result)
    knowledge = result["knowledge"]
    assert (knowledge["in_scope"], knowledge["out_of_scope"]) == (4, 2)
    assert knowledge["answered"] == 1.0 and knowledge["facts"] == 0.75
    assert knowledge["citation"] == 1.0 and knowledge["declined"] == 1.0
    assert knowledge["follow_ups"] == 1.0
    assert knowledge["invented_numbers"] == 0 and knowledge["unsupported_sentences"] == 0
    assert 0 < knowledge["median_words"] <= 80
    assert "knowledge answers: facts 75.0%" in stdout


def test_without_data_an_installed_package_asks_for_a_dialogue_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container image has no examples/: eval and promote say to pass --data."""
    import argparse

    import bot.evaluation

    assert bot.evaluation.dialogue_files(argparse.Namespace(data=None)) == [
        bot.evaluation.EXAMPLE_HELD_OUT
    ]
    monkeypatch.setattr(bot.evaluation, "EXAMPLE_HELD_OUT", tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="pass --data FILE"):
        bot.evaluation.dialogue_files(argparse.Namespace(data=None))
    given = [tmp_path / "mine.jsonl"]
    assert bot.evaluation.dialogue_files(argparse.Namespace(data=given)) == given
