"""Can the chat model itself rerank knowledge-base passages, or tell answerable questions
from unanswerable ones? (Issue 10: an experiment, not a product feature.)

For every question of both evaluation sets, the product's retriever (`core.knowledge.
retrieval.Index.rank`) finds the top `--candidates` passages; the model then scores each by
the mean log-probability of the question's tokens given the passage (query likelihood, as
in UPR, Sachan et al. 2022), and the question given no passage (for the pointwise mutual
information PMI = log P(q | best passage) - log P(q | nothing), an answerability signal).
Reported per set:

- recall@K of the retriever, and top-1 accuracy (the expected document first) of the
  retriever, of the model alone, and of `score + w * log P(q | passage)` for several w;
- how well the retriever's best score, PMI, and their sums separate answerable from
  unanswerable questions (ROC AUC: 1 is perfect, 0.5 is chance);
- seconds of model time per question on this machine.

    .venv/bin/python bench/lm_rerank.py            # bundled SmolLM2, fp32, both sets

Figures go to stdout and to bench/results/lm-rerank-<dtype>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.generation.model_files import load_model  # noqa: E402
from core.knowledge.documents import read_documents  # noqa: E402
from core.knowledge.embeddings import Embedder, load_embedder  # noqa: E402
from core.knowledge.retrieval import Index, index_vocabulary  # noqa: E402
from core.settings import Settings  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SETS = {
    "tuning": (REPO_ROOT / "examples" / "kb", REPO_ROOT / "examples" / "eval.yaml"),
    "held-out": (
        REPO_ROOT / "examples" / "ledgerly" / "kb",
        REPO_ROOT / "examples" / "ledgerly" / "eval.yaml",
    ),
}
PROMPT = (
    "Here is a passage from a company's help centre:\n\n{passage}\n\n"
    "Write a question a customer could ask that this passage answers."
)
NO_PASSAGE = "(no passage)"
MAX_QUESTION_TOKENS = 48
WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.5)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def build_index(folder: Path, embedder: Embedder) -> Index:
    passages = [p for document in read_documents(folder) for p in document.passages]
    vectors = embedder.embed_sync([p.embedding_text() for p in passages])
    sentence_vectors = [embedder.embed_sync(p.sentences) for p in passages]
    vocabulary = index_vocabulary(passages)
    return Index(
        1, passages, vectors, sentence_vectors, vocabulary, embedder.embed_sync(vocabulary)
    )


class QuestionScorer:
    """Mean log P(question tokens | a prompt holding one passage), one batch per question."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device

    @torch.inference_mode()
    def score(self, passages: list[str], question: str) -> list[float]:
        tok = self.tokenizer
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": PROMPT.format(passage=p)}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in passages
        ]
        question_ids = tok(question, add_special_tokens=False)["input_ids"][:MAX_QUESTION_TOKENS]
        rows = [tok(p, add_special_tokens=False)["input_ids"] + question_ids for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id or 0)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: the question ends every row
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        n = len(question_ids)
        logprobs = torch.log_softmax(logits.logits[:, -n - 1 : -1].float(), -1)
        target = torch.tensor(question_ids, device=self.device).expand(len(rows), -1)
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return [float(v) for v in picked.mean(-1)]


def question_rows(
    index: Index, embedder: Embedder, scorer: QuestionScorer, questions: Path, candidates: int
) -> tuple[list[dict[str, Any]], list[float]]:
    entries = yaml.safe_load(questions.read_text(encoding="utf-8"))
    rows, seconds = [], []
    for scope, key in (("in", "in_scope"), ("out", "out_of_scope")):
        for entry in entries[key]:
            text = entry["question"]
            hits = index.rank(index.query(text), embedder.embed_sync([text])[0], candidates)
            started = time.monotonic()
            given = scorer.score([h.passage.embedding_text() for h in hits], text)
            alone = scorer.score([NO_PASSAGE], text)[0]
            seconds.append(time.monotonic() - started)
            rows.append(
                {
                    "scope": scope,
                    "question": text,
                    "source": entry.get("source"),
                    "titles": [h.passage.title for h in hits],
                    "scores": [h.score for h in hits],
                    "logprob_given": given,
                    "logprob_alone": alone,
                }
            )
    return rows, seconds


def auc(positive: list[float], negative: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return round(float(np.mean(pairs)), 3)


def figures(rows: list[dict[str, Any]], seconds: list[float]) -> dict[str, Any]:
    answerable = [r for r in rows if r["scope"] == "in"]
    unanswerable = [r for r in rows if r["scope"] == "out"]

    def top1(pick: Any) -> float:
        right = [r["titles"][pick(r)] == r["source"] for r in answerable if r["titles"]]
        return round(float(np.mean(right)), 3)

    def pmi(r: dict[str, Any]) -> float:
        return float(max(r["logprob_given"], default=0.0) - r["logprob_alone"])

    def best(r: dict[str, Any]) -> float:
        return float(r["scores"][0]) if r["scores"] else 0.0

    result: dict[str, Any] = {
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "recall_at_k": round(float(np.mean([r["source"] in r["titles"] for r in answerable])), 3),
        "top1_retriever": top1(lambda r: 0),
        "top1_model_alone": top1(lambda r: int(np.argmax(r["logprob_given"]))),
        "top1_combined": {
            str(w): top1(
                lambda r, w=w: int(
                    np.argmax(np.array(r["scores"]) + w * np.array(r["logprob_given"]))
                )
            )
            for w in WEIGHTS
        },
        "answerability_auc": {
            "retriever_best_score": auc(
                [best(r) for r in answerable], [best(r) for r in unanswerable]
            ),
            "pmi": auc([pmi(r) for r in answerable], [pmi(r) for r in unanswerable]),
            **{
                f"score+{w}*pmi": auc(
                    [best(r) + w * pmi(r) for r in answerable],
                    [best(r) + w * pmi(r) for r in unanswerable],
                )
                for w in (0.02, 0.05, 0.1)
            },
        },
        "model_seconds_per_question": {
            "median": round(statistics.median(seconds), 3),
            "max": round(max(seconds), 3),
        },
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5, help="passages reranked")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    settings = Settings.from_mapping({"CHATBOT_DEVICE": "cpu", "CHATBOT_DTYPE": args.dtype})
    model, tokenizer, device = load_model(
        settings.model, settings.device, settings.dtype, settings.cache_dir, print
    )
    model.eval()
    embedder = load_embedder()
    scorer = QuestionScorer(model, tokenizer, device)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "model": "bundled SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "candidates": args.candidates,
        "sets": {},
    }
    for name, (kb, questions) in SETS.items():
        rows, seconds = question_rows(
            build_index(kb, embedder), embedder, scorer, questions, args.candidates
        )
        report["sets"][name] = figures(rows, seconds)
        print(name, json.dumps(report["sets"][name], indent=1))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"lm-rerank-{args.dtype}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
