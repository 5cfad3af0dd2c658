"""`chatbot eval`: perplexity, BLEU and chrF on dialogues, and with `--kb DIR --questions
FILE` the knowledge-answer metrics (`core.training.kb_eval`); `chatbot model promote` uses
the same evaluation.

An evaluation loads a model of its own and, for the knowledge answers, a private Redis: the
running service is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.settings import Settings

EXAMPLE_HELD_OUT = (
    Path(__file__).resolve().parent.parent / "examples" / "dialogues" / "held-out.jsonl"
)
KNOWLEDGE_TIMEOUT_S = 1800.0
KnowledgeSet = tuple[Path, Path]  # (knowledge-base folder, question file)


def dialogue_files(args: argparse.Namespace) -> list[Path]:
    """`--data`, else the example company's held-out dialogues (a source checkout has them;
    an installed package, e.g. a container image, does not)."""
    if args.data:
        return list(args.data)
    if not EXAMPLE_HELD_OUT.is_file():
        raise DataError(
            f"no --data given and {EXAMPLE_HELD_OUT} does not exist here (an installed package "
            "has no examples/): pass --data FILE with your held-out dialogues"
        )
    return [EXAMPLE_HELD_OUT]


def progress(message: str, *args: Any) -> None:
    print(message % args if args else message, file=sys.stderr)


def _model_env(settings: Settings, model_spec: str) -> dict[str, str]:
    """The settings that choose and shape the model: only these, so an evaluation never
    depends on (or touches) the running service's Redis."""
    return {
        "CHATBOT_MODEL": model_spec,
        "CHATBOT_DEVICE": settings.device,
        "CHATBOT_DTYPE": settings.dtype,
        "CHATBOT_CACHE_DIR": str(settings.cache_dir),
        "CHATBOT_CONTEXT_TOKENS": str(settings.context_tokens),
        "CHATBOT_MAX_NEW_TOKENS": str(settings.max_new_tokens),
        "CHATBOT_MAX_BATCH_SIZE": str(settings.max_batch_size),
    }


async def evaluate_model(
    settings: Settings, model_spec: str, data: list[Path], knowledge: KnowledgeSet | None = None
) -> dict[str, Any]:
    from core.generation.transformers_engine import open_engine
    from core.training.data import load_dialogues, rows
    from core.training.evaluate import evaluate

    dialogues = load_dialogues(data)
    eval_rows = rows(dialogues, settings.persona)
    engine = await open_engine(Settings.from_mapping(_model_env(settings, model_spec)), progress)
    try:
        result = await evaluate(
            engine,
            eval_rows,
            model_name=model_spec or "bundled SmolLM2-135M-Instruct",
            dialogues=len(dialogues),
            max_new_tokens=settings.max_new_tokens,
        )
    finally:
        engine.close()
    figures = result.to_dict()
    if knowledge is not None:
        figures["knowledge"] = await _evaluate_knowledge(settings, model_spec, knowledge)
    return figures


async def _evaluate_knowledge(
    settings: Settings, model_spec: str, knowledge: KnowledgeSet
) -> dict[str, Any]:
    from core.knowledge.embeddings import load_embedder
    from core.training.kb_eval import answer_questions, load_questions, score

    kb_dir, question_file = knowledge
    questions = load_questions(question_file)  # a bad file fails before the model loads
    embedder = await asyncio.to_thread(load_embedder)
    answers = await answer_questions(
        kb_dir,
        questions,
        embedder,
        env=_model_env(settings, model_spec),
        timeout_s=KNOWLEDGE_TIMEOUT_S,
        progress=lambda line: progress("%s", line),
    )
    scored = score(questions, answers)
    return {
        "knowledge_base": str(kb_dir),
        "questions": str(question_file),
        "in_scope": scored["in_scope"],
        "out_of_scope": scored["out_of_scope"],
        **scored["product"],
    }


def knowledge_set(args: argparse.Namespace) -> KnowledgeSet | None:
    if (args.kb is None) != (args.questions is None):
        raise DataError("--kb DIR and --questions FILE go together")
    if args.kb is None:
        return None
    if not args.kb.is_dir():
        raise DataError(f"--kb {args.kb}: not a folder")
    from core.training.kb_eval import load_questions

    load_questions(args.questions)  # checked now, before any model is loaded
    return args.kb, args.questions


def print_figures(label: str, figures: dict[str, Any]) -> None:
    print(
        f"{label}: perplexity {figures['perplexity']:.3f}, BLEU {figures['bleu']:.2f}, "
        f"chrF {figures['chrf']:.2f} ({figures['assistant_tokens']} assistant tokens, "
        f"{figures['dialogues']} dialogues)"
    )
    k = figures.get("knowledge")
    if k:
        print(
            f"{' ' * len(label)}  knowledge answers: facts {k['facts']:.1%}, citation "
            f"{k['citation']:.1%}, answered {k['answered']:.1%}, declined {k['declined']:.1%}, "
            f"invented numbers {k['invented_numbers']}, unsupported sentences "
            f"{k['unsupported_sentences']}, median {k['median_words']} words"
        )


async def cmd_eval(settings: Settings, args: argparse.Namespace) -> int:
    data = dialogue_files(args)
    knowledge = knowledge_set(args)
    specs = args.compare or [settings.model if args.model is None else args.model]
    results = [await evaluate_model(settings, spec, data, knowledge) for spec in specs]
    for result in results:
        print_figures(result["model"], result)
    if args.json:
        args.json.write_text(json.dumps(results if args.compare else results[0], indent=2) + "\n")
    return 0


def add_knowledge_arguments(parser: Any) -> None:
    parser.add_argument(
        "--kb", type=Path, default=None, metavar="DIR", help="also the knowledge-answer metrics"
    )
    parser.add_argument(
        "--questions", type=Path, default=None, metavar="FILE", help="questions for --kb (YAML)"
    )
