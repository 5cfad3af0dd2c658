"""Knowledge-answer metrics: a question file answered end to end by the real worker.

A question file (YAML) has `in_scope` entries `{question, expected: [facts], source}`,
`out_of_scope` entries `{question, kind}` and optional `follow_ups`
`{history: [question, …], question, expected, source}` (see examples/eval.yaml). Each
question is a new conversation (a follow-up is asked in the conversation of its history) on
a private redis-server in a temporary folder, with the knowledge base ingested there and the
given model served: nothing of a running service is touched. The figures:

- facts: in-scope questions answered with every expected fact (case-insensitive);
- citation: in-scope questions answered citing the expected document (title or FAQ question);
- answered / declined: in-scope questions answered; out-of-scope questions declined;
- invented numbers: replies with a number, e-mail or link found nowhere in the knowledge base;
- unsupported sentences: sentences outside the fixed frames that no passage supports;
- median words of an answer (without its source line); follow-ups answered with their facts.

`chatbot eval --kb DIR --questions FILE` and bench/evaluate_kb.py both use this module.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.conversation import ConversationKey
from core.errors import DataError
from core.inbound import submit_user_message
from core.jobs import JobQueue
from core.keys import Keys
from core.knowledge.answers import FRAMES
from core.knowledge.embeddings import Embedder
from core.knowledge.retrieval import Index, Retriever
from core.knowledge.sentences import split_sentences
from core.knowledge.store import KnowledgeBaseStore
from core.knowledge.verify import Verifier, invented_facts
from core.redis_conn import Redis, connect
from core.redis_server import RedisServer
from core.settings import Settings
from core.store import ConversationStore
from core.support.forget import FORGET_CONFIRM_TEXT, FORGET_DONE
from core.support.handoff import HANDOFF_NO_CONTACT, HANDOFF_STARTED

# The product's other fixed, fact-free replies (a customer who asks for a person is told so).
FIXED_REPLIES = (HANDOFF_STARTED, HANDOFF_NO_CONTACT, FORGET_CONFIRM_TEXT, FORGET_DONE)
# Figures where a higher value is better, and where a lower one is (`chatbot model promote`).
HIGHER_IS_BETTER = ("facts", "citation", "answered", "declined", "follow_ups")
LOWER_IS_BETTER = ("invented_numbers", "unsupported_sentences")
_SOURCE_LINE = re.compile(r"^Sources?: (.*)$", re.MULTILINE)
_POLL_S = 0.3


@dataclass(frozen=True)
class QuestionSet:
    path: Path
    in_scope: list[dict[str, Any]]
    out_of_scope: list[dict[str, Any]]
    follow_ups: list[dict[str, Any]]


@dataclass(frozen=True)
class Answers:
    """What the worker replied: every reply per conversation, oldest first."""

    index: Index
    replies: dict[str, list[dict[str, str]]]
    seconds: float


def _text(path: Path, section: str, n: int, entry: Mapping[str, Any], field: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: {section} entry {n}: `{field}` must be non-empty text")
    return value


def _facts(path: Path, section: str, n: int, entry: Mapping[str, Any]) -> None:
    expected = entry.get("expected")
    if not (isinstance(expected, list) and expected and all(isinstance(f, str) for f in expected)):
        raise DataError(f"{path}: {section} entry {n}: `expected` must be a list of texts")
    _text(path, section, n, entry, "source")


def load_questions(path: Path) -> QuestionSet:
    """A question file, checked: every problem names the file, the section and the entry."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with `in_scope` and `out_of_scope` lists")
    sections: dict[str, list[dict[str, Any]]] = {}
    for section in ("in_scope", "out_of_scope", "follow_ups"):
        entries = data.get(section) or []
        if not isinstance(entries, list) or (section != "follow_ups" and not entries):
            raise DataError(f"{path}: `{section}` must be a non-empty list")
        for n, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict):
                raise DataError(f"{path}: {section} entry {n}: expected a mapping")
            _text(path, section, n, entry, "question")
            if section != "out_of_scope":
                _facts(path, section, n, entry)
            if section == "follow_ups":
                history = entry.get("history")
                if not (isinstance(history, list) and history and all(map(_is_text, history))):
                    raise DataError(f"{path}: {section} entry {n}: `history` must list questions")
        sections[section] = entries
    return QuestionSet(path, sections["in_scope"], sections["out_of_scope"], sections["follow_ups"])


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


async def _ask(
    redis: Redis,
    settings: Settings,
    questions: list[tuple[str, str]],
    expect: int,
    deadline: float,
    worker_task: asyncio.Task[None],
) -> dict[str, list[dict[str, str]]]:
    """Submit (conversation, text) pairs; wait until each of them has `expect` replies."""
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
        if worker_task.done():
            worker_task.result()
            raise RuntimeError("the worker stopped before answering every question")
        entries: Any = await redis.xrange(keys.outbox("console"))
        replies: dict[str, list[dict[str, str]]] = {}
        for _, fields in entries:
            channel = ConversationKey.from_id(fields["conversation"]).channel
            replies.setdefault(channel, []).append(fields)
        if all(len(replies.get(c, [])) >= expect for c, _ in questions):
            return replies
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not answer every question in time")
        await asyncio.sleep(_POLL_S)


async def _ask_all(
    redis: Redis,
    settings: Settings,
    questions: QuestionSet,
    deadline: float,
    worker_task: asyncio.Task[None],
) -> dict[str, list[dict[str, str]]]:
    """Every question in a conversation of its own; then each follow-up's history, one turn
    at a time, and the follow-up itself, in the conversation of that history."""
    first = [
        (f"q{i}", q["question"]) for i, q in enumerate(questions.in_scope + questions.out_of_scope)
    ]
    replies = await _ask(redis, settings, first, 1, deadline, worker_task)
    depth = max((len(f["history"]) for f in questions.follow_ups), default=0)
    for turn in range(depth + 1):
        asked = [
            (f"f{i}", (f["history"] + [f["question"]])[turn])
            for i, f in enumerate(questions.follow_ups)
            if turn <= len(f["history"])
        ]
        if asked:
            replies = await _ask(redis, settings, asked, turn + 1, deadline, worker_task)
    return replies


async def answer_questions(
    kb_dir: Path,
    questions: QuestionSet,
    embedder: Embedder,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    progress: Callable[[str], None],
) -> Answers:
    """Ingest `kb_dir` into a private Redis and let a real worker answer every question.

    `env` holds the model settings (`CHATBOT_MODEL`, device, dtype, …); Redis, namespace and
    data folder are this function's own."""
    from core.generation.transformers_engine import open_engine
    from core.worker import Worker

    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        url = await asyncio.to_thread(server.start)
        redis = connect(url)
        try:
            own = {"REDIS_URL": url, "CHATBOT_NAMESPACE": "eval", "CHATBOT_DATA_DIR": tmp}
            settings = Settings.from_mapping({**env, **own})
            kb_store = KnowledgeBaseStore(redis, Keys(settings.namespace))
            report = await kb_store.ingest(settings.kb, kb_dir, embedder)
            progress(f"ingested {kb_dir}: {report.summary()}")
            retriever = Retriever(kb_store, embedder)
            index = await retriever.index(settings.kb)
            engine = await open_engine(settings, progress)
            embedder.executor = engine.executor
            await JobQueue(redis, Keys(settings.namespace)).ensure_group()
            worker = Worker(redis, settings, engine, retriever=retriever)
            task = asyncio.create_task(worker.run())
            started = time.monotonic()
            deadline = started + timeout_s
            try:
                replies = await _ask_all(redis, settings, questions, deadline, task)
                seconds = time.monotonic() - started
            finally:
                worker.stop()
                await task
                engine.close()
                embedder.executor = None  # the engine's thread is gone
        finally:
            await redis.aclose()
            await asyncio.to_thread(server.stop)
    return Answers(index, replies, seconds)


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


def share(values: Iterable[object]) -> float:
    items = list(values)
    return round(sum(bool(v) for v in items) / len(items), 3) if items else 0.0


def knowledge_texts(index: Index) -> list[str]:
    return [p.text for p in index.passages] + [p.title for p in index.passages]


def _question_row(
    q: Mapping[str, Any],
    reply: Mapping[str, str],
    answerable: bool,
    texts: list[str],
    verifier: Verifier,
) -> dict[str, Any]:
    answered = reply["kind"] == "answer"
    body = body_of(reply["text"])
    return {
        "scope": "in" if answerable else "out",
        "kind_of_question": q.get("kind", ""),
        "question": q["question"],
        "kind": reply["kind"],
        "facts": answerable and answered and contains_all(body, q["expected"]),
        "cites": answerable and answered and cites(reply["text"], q["source"]),
        "invented": invented_facts(body, texts),
        "unsupported": unsupported(reply["text"], verifier),
        "words": len(body.split()),
        "reply": reply["text"],
    }


def score(questions: QuestionSet, answers: Answers) -> dict[str, Any]:
    """The product's figures (`product`) and one row per question (`rows`, `follow_up_rows`)."""
    texts = knowledge_texts(answers.index)
    verifier = Verifier(texts, FRAMES + FIXED_REPLIES)
    in_scope = questions.in_scope
    rows = [
        _question_row(q, answers.replies[f"q{i}"][0], i < len(in_scope), texts, verifier)
        for i, q in enumerate(in_scope + questions.out_of_scope)
    ]
    inside = [r for r in rows if r["scope"] == "in"]
    outside = [r for r in rows if r["scope"] == "out"]
    answers_given = [r for r in rows if r["kind"] == "answer"]
    follow_rows = []
    for i, f in enumerate(questions.follow_ups):
        reply = answers.replies[f"f{i}"][-1]
        follow_rows.append(
            {
                "history": f["history"],
                "question": f["question"],
                "facts": reply["kind"] == "answer"
                and contains_all(body_of(reply["text"]), f["expected"]),
                "reply": reply["text"],
            }
        )
    kinds = sorted({r["kind_of_question"] for r in outside})
    product = {
        "facts": share(r["facts"] for r in inside),
        "citation": share(r["cites"] for r in inside),
        "answered": share(r["kind"] == "answer" for r in inside),
        "declined": share(r["kind"] == "decline" for r in outside),
        "declined_by_kind": {
            kind: share(r["kind"] == "decline" for r in outside if r["kind_of_question"] == kind)
            for kind in kinds
        },
        "invented_numbers": sum(bool(r["invented"]) for r in rows),
        "unsupported_sentences": sum(len(r["unsupported"]) for r in rows),
        "median_words": statistics.median(r["words"] for r in answers_given)
        if answers_given
        else 0,
        "follow_ups": share(r["facts"] for r in follow_rows) if follow_rows else None,
        "seconds": round(answers.seconds, 1),
    }
    return {
        "in_scope": len(inside),
        "out_of_scope": len(outside),
        "product": product,
        "rows": rows,
        "follow_up_rows": follow_rows,
    }


def knowledge_regressions(
    candidate: Mapping[str, Any], serving: Mapping[str, Any], tolerance: float = 0.02
) -> list[str]:
    """The knowledge-answer figures on which `candidate` is worse than `serving`."""
    worse = []
    for name in HIGHER_IS_BETTER:
        new, old = candidate.get(name), serving.get(name)
        if new is not None and old is not None and new < old - tolerance:
            worse.append(f"knowledge {name} {new:.3f} < {old:.3f}")
    for name in LOWER_IS_BETTER:
        new, old = candidate.get(name), serving.get(name)
        if new is not None and old is not None and new > old:
            worse.append(f"knowledge {name} {new} > {old}")
    return worse
