"""Knowledge bases with the real embedding model: ingestion, retrieval, grounded answers,
declining what the knowledge base does not cover."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey
from core.generation.transformers_engine import TransformersEngine
from core.keys import Keys
from core.knowledge.answers import DECLINE_TEXT, QUOTE_INTRO, invented_facts
from core.knowledge.documents import KnowledgeBaseError, read_documents
from core.knowledge.embeddings import Embedder
from core.knowledge.retrieval import Retriever
from core.knowledge.store import KnowledgeBaseStore
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
    _, passages, vectors = await store.load("acme")
    assert vectors.shape == (len(passages), 384)
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
    settings = make_settings(CHATBOT_MAX_NEW_TOKENS="64")
    engine = ScriptedEngine(tiny_engine, lambda r: "Standard shipping costs $5.95 per order.")
    worker = Worker(redis, settings, engine, retriever=Retriever(kb_store, embedder))
    yield worker, engine, settings


async def test_a_grounded_answer_quotes_the_passage_and_cites_its_source(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, engine, settings = kb_worker
    conv = ConversationKey("test", "w", "c1")
    await submit(redis, settings, conv, "How much is standard shipping?", "m1")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 1), "an answer")
    [reply] = await outbox(redis, settings)
    assert reply.kind == "answer"
    assert reply.text.startswith("Standard shipping costs $5.95 per order.")
    assert "\n> " in reply.text and "$5.95" in reply.text.split("\n> ", 1)[1]
    source = reply.meta["sources"][0]
    assert reply.text.rstrip().endswith(f"Source: {source}")
    assert source in ("Shipping Policy", "How much does standard shipping cost?")
    assert reply.actions == ["feedback"]
    # The passages were in the model's prompt.
    [request] = engine.requests
    assert "$5.95" in request.turns[0]["content"]


async def test_a_lead_in_that_invents_a_number_is_dropped(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, engine, settings = kb_worker
    engine.answer = lambda r: "Shipping is $2.99, call us at 555-0199!"
    conv = ConversationKey("test", "w", "c2")
    await submit(redis, settings, conv, "How much is standard shipping?", "m1")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 1), "an answer")
    [reply] = await outbox(redis, settings)
    assert "2.99" not in reply.text and "555-0199" not in reply.text
    assert reply.text.startswith(QUOTE_INTRO)
    assert "$5.95" in reply.text


async def test_an_out_of_scope_question_is_declined_with_a_person_offered(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings]
) -> None:
    worker, engine, settings = kb_worker
    conv = ConversationKey("test", "w", "c3")
    await submit(redis, settings, conv, "Who won the 2022 FIFA World Cup?", "m1")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 1), "a reply")
    [reply] = await outbox(redis, settings)
    assert (reply.kind, reply.text, reply.actions) == ("decline", DECLINE_TEXT, ["handoff"])
    assert engine.requests == []  # nothing was generated, so nothing could be invented


async def test_a_workspace_persona_and_knowledge_base_apply_to_that_workspace_only(
    redis: Any, kb_worker: tuple[Worker, ScriptedEngine, Settings], keys: Keys
) -> None:
    worker, engine, settings = kb_worker
    workspaces = Workspaces(redis, keys, settings)
    await workspaces.set("test", "special", {"persona": "You are Pip, the Harbor & Pine bot."})
    await workspaces.set("test", "empty-kb", {"kb": "nothing-here"})
    await submit(redis, settings, ConversationKey("test", "special", "c"), "Shipping cost?", "m1")
    await submit(redis, settings, ConversationKey("test", "w", "c"), "Shipping cost?", "m2")
    await submit(redis, settings, ConversationKey("test", "empty-kb", "c"), "hi there", "m3")
    await run_worker_until(worker, lambda: _has_replies(redis, settings, 3), "three replies")
    systems = {r.request_id.split(":")[1]: r.turns[0]["content"] for r in engine.requests}
    assert systems["special"].startswith("You are Pip")
    assert not systems["w"].startswith("You are Pip")
    # A workspace whose knowledge base is empty chats without passages.
    assert "help-centre passages" not in systems["empty-kb"]


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
