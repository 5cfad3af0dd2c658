"""Knowledge bases with the real embedding model: ingestion, retrieval, grounded answers,
declining what the knowledge base does not cover."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey
from core.generation.transformers_engine import TransformersEngine
from core.keys import Keys
from core.knowledge.answers import (
    DECLINE_TEXT,
    FRAMES,
    GREETING_TEXT,
    NO_DOCUMENTS_TEXT,
    QUOTE_INTRO,
    THANKS_TEXT,
)
from core.knowledge.documents import KnowledgeBaseError, read_documents
from core.knowledge.embeddings import Embedder
from core.knowledge.retrieval import Retriever, content_words
from core.knowledge.sentences import split_sentences
from core.knowledge.store import KnowledgeBaseStore
from core.knowledge.verify import Verifier, invented_facts
from core.policy import detect_intent
from core.settings import Settings
from core.support.workspaces import Workspaces
from core.worker import Worker
from tests.helpers import ScriptedEngine, outbox, submit, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kb"


@pytest.fixture
async def kb_store(redis: Any, keys: Keys, embedder: Embedder) -> KnowledgeBaseStore:
    store = KnowledgeBaseStore(redis, keys)
    await store.ingest("default", EXAMPLES, embedder)
    return store


async def run_worker_until(worker: Worker, check: Any, what: str, timeout_s: float = 30.0) -> None:
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(check, timeout_s, what)
    finally:
        worker.stop()
        await task


# -- ingestion ----------------------------------------------------------------------------


async def test_ingest_reads_markdown_and_faq_and_is_idempotent(
    kb_store: KnowledgeBaseStore, embedder: Embedder
) -> None:
    documents = await kb_store.documents("default")
    assert "shipping.md" in documents and "faq.yaml" in documents
    assert documents["shipping.md"]["title"] == "Shipping Policy"
    version = await kb_store.version("default")
    again = await kb_store.ingest("default", EXAMPLES, embedder)
    assert again.added == again.updated == again.removed == []
    assert len(again.unchanged) == len(documents)
    assert await kb_store.version("default") == version  # workers keep their copy
    assert await kb_store.names() == ["default"]


async def test_reingest_updates_changed_files_and_prunes_removed_ones(
    redis: Any, keys: Keys, embedder: Embedder, tmp_path: Path
) -> None:
    folder = tmp_path / "kb"
    shutil.copytree(EXAMPLES, folder)
    store = KnowledgeBaseStore(redis, keys)
    first = await store.ingest("acme", folder, embedder)
    assert len(first.added) == 10
    (folder / "warranty.md").unlink()
    text = (folder / "shipping.md").read_text()
    (folder / "shipping.md").write_text(text.replace("$5.95", "$6.25"))
    second = await store.ingest("acme", folder, embedder)
    assert second.updated == ["shipping.md"] and second.removed == ["warranty.md"]
    _, passages, vectors, sentence_vectors = await store.load("acme")
    assert vectors.shape == (len(passages), 384)
    # Every sentence an answer may quote has its vector, stored at ingest.
    assert all(
        v is not None and v.shape == (len(p.sentences), 384)
        for p, v in zip(passages, sentence_vectors, strict=True)
    )
    assert not any(p.document == "warranty.md" for p in passages)
    assert any("$6.25" in p.text for p in passages)
    assert not any("$5.95" in p.text and p.document == "shipping.md" for p in passages)
    assert await store.remove_document("acme", "faq.yaml")
    assert "faq.yaml" not in await store.documents("acme")
    assert await store.remove("acme")
    assert await store.documents("acme") == {}
    assert await store.names() == []


def test_a_malformed_faq_names_the_file_and_the_entry(tmp_path: Path) -> None:
    (tmp_path / "faq.yaml").write_text("- question: Hi?\n  answer: Hello.\n- question: Only?\n")
    with pytest.raises(KnowledgeBaseError, match=r"faq\.yaml: entry 2 needs both"):
        list(read_documents(tmp_path))
    (tmp_path / "faq.yaml").write_text("question: [unclosed\n")
    with pytest.raises(KnowledgeBaseError, match="not valid YAML"):
        list(read_documents(tmp_path))


def test_a_json_faq_is_read_like_a_yaml_one(tmp_path: Path) -> None:
    (tmp_path / "faq.json").write_text('[{"question": "Do you ship to Mars?", "answer": "No."}]')
    [document] = list(read_documents(tmp_path))
    assert [(p.title, p.text) for p in document.passages] == [("Do you ship to Mars?", "No.")]


async def test_retrieval_finds_the_passage_with_the_fact(
    kb_store: KnowledgeBaseStore, embedder: Embedder
) -> None:
    retriever = Retriever(kb_store, embedder)
    cases = {
        "how much does standard shipping cost?": "$5.95",
        "what number can i call you on": "503-555-0142",
        "how long do I have to return something?": "30 days",
    }
    for question, fact in cases.items():
        hits = await retriever.search("default", question)
        assert any(fact in h.passage.text for h in hits), (question, hits)
        assert hits[0].score >= Settings().kb_min_score, (question, hits[0])
    far = await retriever.search("default", "Who won the 2022 FIFA World Cup?")
    assert far[0].score < Settings().kb_min_score


async def test_a_knowledge_base_ingested_without_sentence_vectors_still_answers(
    redis: Any, keys: Keys, kb_store: KnowledgeBaseStore, embedder: Embedder
) -> None:
    # As an older version stored it: passages with their vector only.
    raw = await redis.hgetall(keys.kb_passages("default"))
    old = {pid: json.loads(record) for pid, record in raw.items()}
    for record in old.values():
        del record["sentence_vectors"]
    await redis.hset(
        keys.kb_passages("default"), mapping={k: json.dumps(v) for k, v in old.items()}
    )
    await redis.incr(keys.kb_version("default"))
    index = await Retriever(kb_store, embedder).index("default")
    assert len(index.sentence_matrix) == sum(len(p.sentences) for p in index.passages) > 0
    hits = await Retriever(kb_store, embedder).search("default", "how much is standard shipping?")
    assert "$5.95" in hits[0].passage.text and len(hits[0].sentence_cosines) > 0


async def test_misspelt_words_are_corrected_and_unknown_ones_reported(
    kb_store: KnowledgeBaseStore, embedder: Embedder
) -> None:
    retriever = Retriever(kb_store, embedder)
    index = await retriever.index("default")
    query = index.query("forgot my pasword, whats the adress for returns")
    assert content_words("password address") <= query.words and not query.missing
    [search] = await retriever.search_many("default", ["Do you have a discount for pensioners?"])
    assert search.query.missing == {"pensioner"} and search.unknown_share > 0.3


# -- answers ------------------------------------------------------------------------------


def test_intents() -> None:
    assert detect_intent("Can I talk to a real person please?") == "handoff"
    assert detect_intent("agent") == "handoff"
    assert detect_intent("please forget me") == "forget"
    assert detect_intent("delete my data") == "forget"
    assert detect_intent("thanks so much!") == "small_talk"
    assert detect_intent("how do I return my tent?") == "question"


def test_invented_facts_are_the_ones_missing_from_the_sources() -> None:
    sources = ["Standard shipping costs $5.95 and takes 3-7 business days."]
    assert invented_facts("It costs $5.95.", sources) == []
    assert invented_facts("It costs $3.50, call 555-0100.", sources) == ["3.50", "555-0100"]
    assert invented_facts("Write to help@example.com", sources) == ["help@example.com"]


@pytest.fixture
async def kb_worker(
    redis: Any,
    make_settings: Any,
    kb_store: KnowledgeBaseStore,
    embedder: Embedder,
    tiny_engine: TransformersEngine,
) -> AsyncIterator[tuple[Worker, ScriptedEngine, Settings]]:
    """The default support assistant (no persona of its own) on the example knowledge base;
    its engine would write a false lead-in, if it were ever asked."""
    settings = make_settings(CHATBOT_MAX_NEW_TOKENS="64", CHATBOT_PERSONA=None)
    engine = ScriptedEngine(tiny_engine, lambda r: "No, shipping is always free, call 555-0199!")
    worker = Worker(redis, settings, engine, retriever=Retriever(kb_store, embedder))
    yield worker, engine, settings


def kb_verifier() -> Verifier:
    passages = [p.text for d in read_documents(EXAMPLES) for p in d.passages]
    return Verifier(passages, FRAMES)


def quoted_sentences(text: str) -> list[str]:
    lines = [line.removeprefix(">").strip() for line in text.splitlines()]
    body = [line for line in lines if line and not line.startswith(("Source:", "Sources:"))]
    return [s for line in body for part in line.split(" … ") for s in split_sentences(part)]


async def ask(
    redis: Any, worker: Worker, settings: Settings, questions: dict[str, list[str]]
) -> dict[str, Any]:
    """Each conversation's messages in turn, each after the reply to the one before; the
    last reply of each conversation."""
    before = len(await outbox(redis, settings))
    task = asyncio.create_task(worker.run())
    try:
        for n in range(max(len(m) for m in questions.values())):
            for name, messages in questions.items():
                if n < len(messages):
                    conv = ConversationKey("test", "w", name)
                    await submit(redis, settings, conv, messages[n], f"{name}-{n}")
            expected = before + sum(min(len(m), n + 1) for m in questions.values())
            await wait_for(
                lambda e=expected: _has_replies(redis, settings, e), 30, f"{expected} replies"
            )
    finally:
        worker.stop()
        await task
    last = {}
    for reply in await outbox(redis, settings):
        last[reply.conversation.channel] = reply
    return last


async def test_answers_are_sentences_of_the_knowledge_base_cited_and_short(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, engine, settings = kb_worker
    questions = {
        "shipping": ("how much does standard shipping cost?", "$5.95", ("Shipping", "How much")),
        "call": ("what number can i call you on", "503-555-0142", "Contact Customer Support"),
        "returns": ("how long do I have to return something?", "30 days", ("Returns", "How long")),
        "canada": ("how much is it to send a parcel to Canada?", "$19.95", "Shipping Policy"),
        "typo": ("forgot my pasword, how do i get back in", "Forgot password?", "Your"),
        # The FAQ repeats the policy page here: the same sentence is not quoted twice.
        "repeat": ("how much is shipping to california?", "$5.95", ("Shipping", "How much")),
    }
    replies = await ask(redis, worker, settings, {k: [q] for k, (q, _, _) in questions.items()})
    verifier = kb_verifier()
    for name, (question, fact, source) in questions.items():
        reply = replies[name]
        assert reply.kind == "answer", (question, reply.text)
        assert reply.text.startswith(QUOTE_INTRO) and fact in reply.text, (question, reply.text)
        assert reply.meta["sources"][0].startswith(source), (question, reply.meta)  # str or tuple
        cited = reply.text.splitlines()[-1]
        assert cited.startswith(("Source: ", "Sources: ")), reply.text
        assert all(source in cited for source in reply.meta["sources"]), reply.text
        sentences = quoted_sentences(reply.text)
        assert sentences and len(" ".join(sentences).split()) <= 90, reply.text
        for sentence in sentences:
            assert verifier.check(sentence).supported, (sentence, verifier.check(sentence))
        assert reply.text.count("$5.95") <= 1 or name != "repeat", reply.text
        assert reply.actions == ["feedback"]
    # Nothing was generated: the engine's false "No, shipping is always free" never ran.
    assert engine.requests == []


def test_a_lead_in_that_contradicts_its_passage_never_survives() -> None:
    verifier = kb_verifier()
    passage = next(
        p.text
        for d in read_documents(EXAMPLES)
        for p in d.passages
        if "Overnight shipping is not available to Alaska and Hawaii." in p.text
    )
    assert verifier.check("Overnight shipping is not available to Alaska and Hawaii.").supported
    lead_in = (
        "Yes, overnight shipping is available to Alaska and Hawaii. "
        "We're available 24/7 to help. "
        "Standard shipping to Alaska and Hawaii costs $9.95 per order. "
        "No."
    )
    kept, dropped = Verifier([passage], FRAMES).supported_sentences(lead_in)
    assert kept == [] and len(dropped) == 4, dropped
    assert "opposite" in dropped[0] and "9.95" in dropped[2] and "yes/no" in dropped[3]


def test_a_negation_flip_is_caught() -> None:
    passage = "You need written permission from your landlord before the installation."
    verifier = Verifier([passage])
    assert verifier.check("You need written permission from your landlord.").supported
    for flipped in (
        "You don't need written permission from your landlord.",
        "You do not need written permission from your landlord.",
        "No, you need no written permission from your landlord.",
        "You never need written permission from your landlord.",
    ):
        verdict = verifier.check(flipped)
        assert not verdict.supported and "opposite" in verdict.reason, (flipped, verdict)
    # Two negations say yes: "not ... without" is supported.
    assert (
        Verifier(["Nothing ships without a tracking number."])
        .check("No order ships without a tracking number.")
        .supported
    )


async def test_questions_about_what_the_knowledge_base_lacks_are_declined(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, engine, settings = kb_worker
    questions = {
        "pensioner": "Do you have a discount for pensioners?",
        "ceo": "Who is the CEO of Harbor & Pine?",
        "football": "Who won the 2022 FIFA World Cup?",
    }
    replies = await ask(redis, worker, settings, {k: [q] for k, q in questions.items()})
    for name, question in questions.items():
        reply = replies[name]
        assert (reply.kind, reply.text, reply.actions) == ("decline", DECLINE_TEXT, ["handoff"]), (
            question,
            reply.text,
        )
    assert engine.requests == []  # nothing was generated, so nothing could be invented


async def test_a_long_message_costs_a_bounded_number_of_embeddings(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings], embedder: Embedder
) -> None:
    worker, _, settings = kb_worker
    embedded: list[int] = []
    original = embedder.embed

    async def counting(texts: Any) -> Any:
        embedded.append(len(texts))
        return await original(texts)

    embedder.embed = counting  # type: ignore[method-assign]
    assert worker.policy.retriever is not None
    await worker.policy.retriever.index("default")  # loads the index (embeds its vocabulary)
    embedded.clear()
    story = " ".join(f"On day {n} my cousin Zebulon{n} visited Quixotica{n}." for n in range(150))
    text = f"{story} How much does standard shipping cost?"[-settings.max_message_chars :]
    replies = await ask(redis, worker, settings, {"long": [text]})
    assert replies["long"].kind in ("answer", "decline")
    # The message, at most six of its sentences, and at most 64 unknown words: not one
    # embedding per word or sentence of a pasted essay.
    assert max(embedded) <= 1 + 6 + 64, embedded


async def test_a_follow_up_is_answered_from_the_previous_questions_topic(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, _, settings = kb_worker
    replies = await ask(
        redis,
        worker,
        settings,
        {
            "canada": ["Do you ship to Canada?", "and how long does that take?"],
            "greet": ["hello!", "thanks so much"],
        },
    )
    assert replies["canada"].kind == "answer"
    assert "7 to 14 business days" in replies["canada"].text, replies["canada"].text
    # Greetings and thanks get a short, fixed answer with no facts in it.
    assert (replies["greet"].kind, replies["greet"].text) == ("small_talk", THANKS_TEXT)


async def test_without_a_knowledge_base_the_default_assistant_invents_nothing(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings = make_settings(CHATBOT_PERSONA=None)
    engine = ScriptedEngine(tiny_engine, lambda r: "I'm sorry for your loss. Call 555-0100.")
    worker = Worker(redis, settings, engine)  # no retriever: no knowledge base at all
    for n, text in enumerate(["how do I reset my password?", "hi"]):
        await submit(redis, settings, ConversationKey("test", "w", f"c{n}"), text, f"m{n}")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 2), "two replies")
    replies = {r.conversation.channel: r for r in await outbox(redis, settings)}
    assert (replies["c0"].kind, replies["c0"].text) == ("no_documents", NO_DOCUMENTS_TEXT)
    assert replies["c0"].actions == ["handoff"]
    assert (replies["c1"].kind, replies["c1"].text) == ("small_talk", GREETING_TEXT)
    assert engine.requests == []


async def test_a_workspace_persona_and_knowledge_base_apply_to_that_workspace_only(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings], keys: Keys
) -> None:
    worker, engine, settings = kb_worker
    engine.answer = lambda r: "Hi, I'm Pip!"
    workspaces = Workspaces(redis, keys, settings)
    await workspaces.set("test", "special", {"persona": "You are Pip, the Harbor & Pine bot."})
    await workspaces.set("test", "empty-kb", {"kb": "nothing-here"})
    await submit(redis, settings, ConversationKey("test", "special", "c"), "hi there", "m1")
    await submit(redis, settings, ConversationKey("test", "special", "d"), "Shipping cost?", "m2")
    await submit(redis, settings, ConversationKey("test", "w", "c"), "hi there", "m3")
    await submit(redis, settings, ConversationKey("test", "empty-kb", "c"), "Shipping cost?", "m4")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 4), "four replies")
    replies = {r.conversation.id: r for r in await outbox(redis, settings)}
    # A persona of its own makes the workspace a chat model: its small talk is generated...
    [request] = engine.requests
    assert request.turns[0]["content"].startswith("You are Pip")
    assert replies[ConversationKey("test", "special", "c").id].text == "Hi, I'm Pip!"
    # ...and its questions are still answered from the knowledge base, never by the model.
    assert "$5.95" in replies[ConversationKey("test", "special", "d").id].text
    assert replies[ConversationKey("test", "w", "c").id].text == GREETING_TEXT
    assert replies[ConversationKey("test", "empty-kb", "c").id].kind == "no_documents"


async def _has_replies(redis: Any, settings: Settings, count: int) -> bool:
    return len(await outbox(redis, settings)) >= count


def test_documents_in_other_encodings_and_links_out_of_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "bom.md").write_bytes("\ufeff# Returns\n\nWithin 30 days.\n".encode())
    (folder / "latin.md").write_bytes("# Café opening\n\nOpen at 9.\n".encode("cp1252"))
    (folder / "wide.md").write_bytes("# Shipping\n\nFree over $75.\n".encode("utf-16"))
    secret = tmp_path / "secret.md"
    secret.write_text("# Secret\n\nThe admin password.\n")
    (folder / "link.md").symlink_to(secret)
    documents = {d.id: d for d in read_documents(folder)}
    assert set(documents) == {"bom.md", "latin.md", "wide.md"}  # the link is not followed
    assert documents["bom.md"].title == "Returns"
    assert documents["latin.md"].title == "Café opening"
    assert documents["wide.md"].passages[0].text == "Free over $75."
